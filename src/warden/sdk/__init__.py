"""The Python SDK: ``Sandbox`` (sync) and ``AsyncSandbox`` with the same names and shapes."""

from warden.sdk._async import AsyncCommands, AsyncFiles, AsyncSandbox
from warden.sdk._sync import Commands, Files, Sandbox
from warden.sdk._types import CommandResult, EntryInfo

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Files",
    "Sandbox",
]
