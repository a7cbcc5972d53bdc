"""The Python SDK: ``Sandbox`` (sync) and ``AsyncSandbox`` with the same names and shapes.

Embedded by default; ``connect(url)`` gives a :class:`Client` whose ``Sandbox``/``AsyncSandbox``
make the same classes, backed by a manager daemon.
"""

from warden.sdk._async import AsyncCommands, AsyncFiles, AsyncSandbox
from warden.sdk._remote import Client, RemoteUnsupportedError, connect
from warden.sdk._sync import Commands, Files, Sandbox
from warden.sdk._types import CommandResult, EntryInfo

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "Client",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Files",
    "RemoteUnsupportedError",
    "Sandbox",
    "connect",
]
