"""The CLI's rich consoles, made on first use: importing rich costs ~0.1 s, which a command
that prints nothing through it (``warden run``) must not pay (issue 8, "fast everywhere else")."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer
    from rich.console import Console

EXIT_WARDEN_ERROR = 125
"""The exit status of a command that warden itself failed (a WardenError), as docker's 125."""


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


def warden_exit(exc: BaseException) -> typer.Exit:
    """Print ``warden: <exc>`` on stderr; the ``typer.Exit`` to raise (status 125)."""
    import typer
    from rich.text import Text

    err().print(Text("warden: ", style="red") + Text(str(exc)))
    return typer.Exit(EXIT_WARDEN_ERROR)
