"""Result types of the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field

from warden.agent.client import EntryInfo

__all__ = ["CommandResult", "EntryInfo"]


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
    truncated: bool = False
    """Output was cut at ``max_output`` (stdout or stderr, or both): the command wrote more
    than the result holds. ``on_stdout``/``on_stderr`` saw all of it."""
