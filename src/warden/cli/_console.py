"""The CLI's rich consoles, made on first use: importing rich costs ~0.1 s, which a command
that prints nothing through it (``warden run``) must not pay (issue 8, "fast everywhere else")."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@functools.cache
def out() -> Console:
    """The console on stdout."""
    from rich.console import Console

    return Console()


@functools.cache
def err() -> Console:
    """The console on stderr."""
    from rich.console import Console

    return Console(stderr=True)
