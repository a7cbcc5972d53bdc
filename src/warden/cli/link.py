"""``warden link create|ls|rm``: VM-to-VM links between a daemon's sandboxes.

A link needs the daemon (it relays the link's sealed records): each command asks the daemon
that answers (``--host`` / ``WARDEN_HOST``, or the local socket) and fails, saying so, when none
does. In both sandboxes the link is the unix socket ``/run/warden/links/NAME.sock``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from warden._errors import LinkError, WardenError
from warden.cli._console import out, warden_exit
from warden.cli.remote import HostOption

if TYPE_CHECKING:
    from warden.sdk import Client

link_app = typer.Typer(
    help="Link two sandboxes of the daemon: a byte stream between them, sealed end to end.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NO_DAEMON = "links need the daemon, which relays them: start one with `warden serve`"


def _daemon(host: str | None) -> Client:
    from warden.cli.run import daemon_for_run

    client = daemon_for_run(host, cold=False)
    if client is None:
        raise LinkError(NO_DAEMON)
    return client


@link_app.command("create")
def create(
    a: Annotated[str, typer.Argument(help="A running sandbox (id or name).")],
    b: Annotated[str, typer.Argument(help="Another running sandbox (id or name).")],
    name: Annotated[
        str, typer.Option("--name", help="The link's name: [a-z0-9][a-z0-9_.-]{0,62}.")
    ],
    transport: Annotated[
        str,
        typer.Option(
            "--transport",
            help="ring: shared memory between the two VMs; relay: through the daemon.",
        ),
    ] = "ring",
    host: HostOption = None,
) -> None:
    """Link sandboxes A and B as NAME: each gets /run/warden/links/NAME.sock, and what a
    client writes into one comes out of the other's client."""
    try:
        link = _daemon(host).create_link(a, b, name, transport=transport)
    except WardenError as exc:
        raise warden_exit(exc) from None
    out().print(f"link {link['name']}: {link['a']} <-> {link['b']} ({link['path']})")


@link_app.command("ls")
def ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    host: HostOption = None,
) -> None:
    """List the daemon's open links."""
    try:
        links = _daemon(host).links()
    except WardenError as exc:
        raise warden_exit(exc) from None
    if as_json:
        out().print_json(json.dumps(links))
        return
    from rich.table import Table

    table = Table("NAME", "A", "B", "RELAYED A->B", "RELAYED B->A", "PATH", box=None)
    for link in links:
        table.add_row(
            link["name"],
            link["a"],
            link["b"],
            str(link["relayed_ab"]),
            str(link["relayed_ba"]),
            link["path"],
        )
    out().print(table)


@link_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="The link's name.")],
    host: HostOption = None,
) -> None:
    """Close both ends of link NAME: each end's client sees its connection end with an error."""
    try:
        answer = _daemon(host).remove_link(name)
    except WardenError as exc:
        raise warden_exit(exc) from None
    out().print(f"link {name} removed (both ends closed in {answer['closed_ms']} ms)")
