"""warden: isolated microVM sandboxes for code you don't trust.

    >>> import warden
    >>> with warden.Sandbox.create() as sbx:
    ...     print(sbx.commands.run("uname -r").stdout)

Exports load lazily, so light entry points (the janitor, the CLI's help) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from warden._errors import (
    AgentError,
    AgentTimeoutError,
    CommandTimeoutError,
    GuestFileError,
    HostError,
    ImageError,
    LaunchError,
    SandboxClosedError,
    SpecError,
    VMError,
    WardenError,
)

if TYPE_CHECKING:
    from warden.sdk import AsyncSandbox, CommandResult, EntryInfo, Sandbox

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentTimeoutError",
    "AsyncSandbox",
    "CommandResult",
    "CommandTimeoutError",
    "EntryInfo",
    "GuestFileError",
    "HostError",
    "ImageError",
    "LaunchError",
    "Sandbox",
    "SandboxClosedError",
    "SpecError",
    "VMError",
    "WardenError",
    "__version__",
]

_LAZY = {"AsyncSandbox", "CommandResult", "EntryInfo", "Sandbox"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("warden.sdk"), name)
    raise AttributeError(f"module 'warden' has no attribute {name!r}")
