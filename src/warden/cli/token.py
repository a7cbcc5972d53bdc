"""``warden token create|list|revoke``: the daemon's API tokens (``auth/tokens.py``).

When a daemon answers (``$WARDEN_HOST``, else the local socket), they go through its API
(``/v1/tokens``, an admin action), so the daemon, the audit log's one writer, records each
change. Without one they change ``$WARDEN_HOME/tokens.db`` directly (as root) and record the
change in the audit log themselves. A daemon reads the store on every request, so a revoked
token fails on its next request. A token's text is printed once, by ``create``, alone on
stdout, and is kept nowhere (the store has its SHA-256).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from warden._errors import WardenError
from warden.cli._console import err, out, warden_exit

if TYPE_CHECKING:
    from warden.auth.tokens import TokenInfo
    from warden.sdk._remote import Client

token_app = typer.Typer(
    help="Make, list and revoke API tokens: each names a principal and its roles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LOCK_WAIT_S = 5.0
"""How long a local change waits for the audit log (a daemon that just stopped)."""


def _daemon() -> Client | None:
    """The SDK's client of the daemon, if one answers; None: work on the local store."""
    from warden.sdk._endpoint import Endpoint, default_url
    from warden.sdk._remote import Client, daemon_answers

    url = os.environ.get("WARDEN_HOST") or default_url()
    if not daemon_answers(url):
        if os.environ.get("WARDEN_HOST"):
            raise WardenError(f"no warden daemon answers at {url} (WARDEN_HOST)")
        return None
    return Client(Endpoint.resolve(url))


@contextlib.contextmanager
def _local_audit() -> Iterator[Callable[[str, TokenInfo], None]]:
    """With no daemon: the audit log, opened before the store is changed (a daemon that runs
    holds it: then nothing is changed), and a function that records a change in it."""
    from warden._errors import AuditLogError
    from warden.audit import AuditLog
    from warden.config import Paths
    from warden.server.routes.tokens import audit_fields

    try:
        log = AuditLog.open(Paths.from_env().home, lock_timeout=LOCK_WAIT_S)
    except AuditLogError as exc:
        raise WardenError(
            f"{exc}; a warden daemon that does not answer on the default socket may hold it: "
            "set WARDEN_HOST to its socket, so that the change goes through it"
        ) from None

    def record(action: str, info: TokenInfo) -> None:
        fields: dict[str, Any] = {**audit_fields(info), "via": "cli"}
        log.append(action, principal=_local_user(), **fields)

    with log:
        yield record


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


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
    roles = role or ["user"]
    try:
        client = _daemon()
        if client is not None:
            answer = client.create_token(name, roles=roles, expires=expires)
            info, text = _info(answer), str(answer["text"])
        else:
            info, text = _create_locally(name, roles, expires)
    except WardenError as exc:
        raise warden_exit(exc) from None
    err().print(
        f"token {info.id} for {info.name} (roles: {', '.join(sorted(info.roles))}; expires "
        f"{_when(info.expires) if info.expires else 'never'}). It is shown only now:",
        highlight=False,
    )
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _create_locally(name: str, roles: list[str], expires: str | None) -> tuple[TokenInfo, str]:
    from warden.auth.tokens import TokenStore, parse_expiry

    when = parse_expiry(expires) if expires is not None else None
    with _local_audit() as record, TokenStore.open() as store:
        new = store.create(name, roles, when)
        record("token-create", new.info)
    return new.info, new.text


def _info(row: dict[str, Any]) -> TokenInfo:
    """A token as the API shows it."""
    from warden.auth.tokens import TokenInfo

    return TokenInfo(
        id=str(row["id"]),
        name=str(row["name"]),
        roles=frozenset(row["roles"]),
        created=float(row["created"]),
        expires=row.get("expires"),
        revoked=row.get("revoked"),
        last_used=row.get("last_used"),
        source=str(row.get("source", "api")),
    )


@token_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Every token: id, principal, roles, created, expiry, state. Never a secret."""
    from warden.auth.tokens import TokenStore

    try:
        client = _daemon()
        if client is not None:
            tokens = [_info(row) for row in client.tokens()]
        else:
            with TokenStore.open() as store:
                tokens = store.all()
    except WardenError as exc:
        raise warden_exit(exc) from None
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
        client = _daemon()
        if client is not None:
            revoked = [_info(row) for row in client.revoke_token(which)]
        else:
            with _local_audit() as record, TokenStore.open() as store:
                revoked = store.revoke(which)
                for info in revoked:
                    record("token-revoke", info)
    except WardenError as exc:
        raise warden_exit(exc) from None
    if not revoked:
        err().print(f"{which}: already revoked", highlight=False)
    for t in revoked:
        out().print(f"revoked {t.id} ({t.name})", highlight=False)
