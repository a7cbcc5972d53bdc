"""warden: isolated microVM sandboxes for code you don't trust.

    >>> import warden
    >>> with warden.Sandbox.create() as sbx:
    ...     print(sbx.commands.run("uname -r").stdout)

Against a manager daemon (``warden serve``), the same classes come from a client:

    >>> client = warden.connect()          # $WARDEN_HOST, else the local socket
    >>> with client.Sandbox.create() as sbx:
    ...     print(sbx.commands.run("uname -r").stdout)

Exports load lazily, so light entry points (the janitor, the CLI's help) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from warden._errors import (
    AgentError,
    AgentTimeoutError,
    AgentUnresponsiveError,
    AuthenticationError,
    CommandTimeoutError,
    GuestFileError,
    GuestOperationRefusedError,
    HostError,
    ImageError,
    LaunchError,
    LinkError,
    LinkNotFoundError,
    PermissionDeniedError,
    SandboxClosedError,
    SizeLimitError,
    SpecError,
    TemplateError,
    TemplateNotFoundError,
    TemplateRefusedError,
    TooManyConnectionsError,
    VMError,
    WardenError,
)

if TYPE_CHECKING:
    from warden.sdk import AsyncSandbox, Client, CommandResult, EntryInfo, Sandbox, connect

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentTimeoutError",
    "AgentUnresponsiveError",
    "AsyncSandbox",
    "AuthenticationError",
    "Client",
    "CommandResult",
    "CommandTimeoutError",
    "EntryInfo",
    "GuestFileError",
    "GuestOperationRefusedError",
    "HostError",
    "ImageError",
    "LaunchError",
    "LinkError",
    "LinkNotFoundError",
    "PermissionDeniedError",
    "Sandbox",
    "SandboxClosedError",
    "SizeLimitError",
    "SpecError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateRefusedError",
    "TooManyConnectionsError",
    "VMError",
    "WardenError",
    "__version__",
    "connect",
]

_LAZY = {"AsyncSandbox", "Client", "CommandResult", "EntryInfo", "Sandbox", "connect"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("warden.sdk"), name)
    raise AttributeError(f"module 'warden' has no attribute {name!r}")
