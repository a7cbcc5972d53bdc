"""The Python SDK: ``Sandbox`` (sync) and ``AsyncSandbox`` with the same names and shapes.

Embedded by default; ``connect(url)`` gives a :class:`Client` whose ``Sandbox``/``AsyncSandbox``
make the same classes, backed by a manager daemon. The remote client (and httpx with it) loads
on first use of ``Client``, ``connect`` or ``RemoteUnsupportedError``: embedded mode does not
pay for it (issue 8, "fast everywhere else").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from warden.sdk._async import AsyncCommands, AsyncFiles, AsyncSandbox
from warden.sdk._sync import Commands, Files, Sandbox
from warden.sdk._types import CommandResult, EntryInfo

if TYPE_CHECKING:
    from warden.sdk._remote import Client, RemoteUnsupportedError, connect

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

_REMOTE = {"Client", "RemoteUnsupportedError", "connect"}


def __getattr__(name: str) -> Any:
    if name in _REMOTE:
        return getattr(importlib.import_module("warden.sdk._remote"), name)
    raise AttributeError(f"module 'warden.sdk' has no attribute {name!r}")
