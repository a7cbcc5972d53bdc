"""``warden token create|list|revoke``: the daemon's API tokens (``auth/tokens.py``).

Local commands: they change ``$WARDEN_HOME/tokens.db`` directly (as the daemon's user, root),
also while the daemon runs; it reads the store on every request, so a revoked token fails on
its next request. A token's text is printed once, by ``create``, alone on stdout, and is
kept nowhere (the store has its SHA-256).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from warden._errors import WardenError
from warden.cli._console import err, out

token_app = typer.Typer(
    help="Make, list and revoke API tokens: each names a principal and its roles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_WARDEN_ERROR = 125


def _fail(exc: BaseException) -> typer.Exit:
    from rich.text import Text

    err().print(Text("warden: ", style="red") + Text(str(exc)))
    return typer.Exit(EXIT_WARDEN_ERROR)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%MZ")


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The principal: owner of what the token creates.")],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", "-r", help="A role (repeatable) [default: user]."),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="30d, 12h, 90m, 2w, or a date 2026-12-31 (UTC)."),
    ] = None,
) -> None:
    """Make a token; print it once, alone on stdout: it is kept nowhere."""
    from warden.auth.tokens import TokenStore, parse_expiry

    try:
        when = parse_expiry(expires) if expires is not None else None
        with TokenStore.open() as store:
            new = store.create(name, role or ["user"], when)
    except WardenError as exc:
        raise _fail(exc) from None
    info = new.info
    err().print(
        f"token {info.id} for {info.name} (roles: {', '.join(sorted(info.roles))}; expires "
        f"{_when(info.expires) if info.expires else 'never'}). It is shown only now:",
        highlight=False,
    )
    sys.stdout.write(new.text + "\n")
    sys.stdout.flush()


@token_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Every token: id, principal, roles, created, expiry, state. Never a secret."""
    from warden.auth.tokens import TokenStore

    try:
        with TokenStore.open() as store:
            tokens = store.all()
    except WardenError as exc:
        raise _fail(exc) from None
    now = time.time()
    if as_json:
        rows = [
            {
                "id": t.id, "name": t.name, "roles": sorted(t.roles), "created": t.created,
                "expires": t.expires, "revoked": t.revoked, "last_used": t.last_used,
                "source": t.source, "state": t.state(now),
            }
            for t in tokens
        ]  # fmt: skip
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table: list[tuple[str, ...]] = [
        ("ID", "NAME", "ROLES", "CREATED", "EXPIRES", "STATE", "LAST USED", "SOURCE")
    ]
    table += [
        (
            t.id, t.name, ",".join(sorted(t.roles)), _when(t.created), _when(t.expires),
            t.state(now) + (f" {_when(t.revoked)}" if t.revoked else ""), _when(t.last_used),
            t.source,
        )
        for t in tokens
    ]  # fmt: skip
    sys.stdout.write(_columns(table))


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Plain aligned columns, never cut (an id is what ``revoke`` takes)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


@token_app.command("revoke")
def revoke(
    which: Annotated[str, typer.Argument(help="A token id, or a principal name (all its tokens).")],
) -> None:
    """Revoke a token (or every token of a principal): its next request gets 401."""
    from warden.auth.tokens import TokenStore

    try:
        with TokenStore.open() as store:
            revoked = store.revoke(which)
    except WardenError as exc:
        raise _fail(exc) from None
    if not revoked:
        err().print(f"{which}: already revoked", highlight=False)
    for t in revoked:
        out().print(f"revoked {t.id} ({t.name})", highlight=False)
