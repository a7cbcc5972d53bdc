"""Result types of the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left: its output (decoded as UTF-8) and how it ended."""

    stdout: str
    stderr: str
    exit_code: int
    """The exit status; 128 + N when the command was killed by signal N."""
    signal: int | None = None
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class EntryInfo:
    """A file or directory in the sandbox."""

    name: str
    path: str
    type: str
    """One of ``file``, ``dir``, ``symlink``, ``other``."""
    size: int
    mode: int
    mtime: float
