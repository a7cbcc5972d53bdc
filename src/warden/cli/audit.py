"""``warden audit verify|tail|search``: read and check this host's audit log.

These read ``$WARDEN_HOME/audit/audit.log`` directly, so the daemon need not run; they need
the rights of the owner of ``$WARDEN_HOME`` (root), or, for ``verify --public-only``, a copy of
the log and of the public key ``keys/audit-sign.pub``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from warden._errors import WardenError
from warden.cli._console import warden_exit

audit_app = typer.Typer(
    help="Check and read the tamper-evident audit log of this host ($WARDEN_HOME/audit/).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_PROBLEMS = 1
_CORE = ("seq", "time", "action", "principal", "sandbox", "outcome", "prev", "mac", "sig")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON record a line.")]
PrincipalOption = Annotated[str | None, typer.Option("--principal", help="Only this principal.")]
SandboxOption = Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox id.")]
ActionOption = Annotated[str | None, typer.Option("--action", help="Only this action.")]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="Only records from then on: an ISO time or an age (10m, 2h, 1d)."),
]


def _home() -> Path:
    from warden.config import Paths

    return Paths.from_env().home


@audit_app.command("verify")
def verify_command(
    public_only: Annotated[
        bool,
        typer.Option(
            "--public-only",
            help="Check with the public key alone (signed checkpoints and head), as a verifier "
            "that does not hold the HMAC key would.",
        ),
    ] = False,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key", help="The checkpoint public key (default keys/audit-sign.pub)."
        ),
    ] = None,
    log: Annotated[
        Path | None,
        typer.Option("--log", help="Check this copy of a log (its head file next to it)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check every record, link, checkpoint and the head of the log. Exit 0 if intact, 1 with
    each problem (line, seq, kind: modified, deleted, inserted, reordered, truncated, torn,
    bad-checkpoint, bad-key)."""
    from warden.audit import verify

    try:
        report = verify(_home(), public_only=public_only, public_key=public_key, log=log)
    except WardenError as exc:
        raise warden_exit(exc) from None
    if as_json:
        body = {
            "ok": report.ok,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "last_seq": report.last_seq,
            "mode": report.mode,
            "unverified_after": report.unverified_after,
            "problems": [vars(p) for p in report.problems],
        }
        print(json.dumps(body))
    else:
        _print_report(report)
    raise typer.Exit(0 if report.ok else EXIT_PROBLEMS)


def _print_report(report: Any) -> None:
    for problem in report.problems:
        print(str(problem))
    how = "HMAC chain + signatures" if report.mode == "mac" else "public key only"
    state = "intact" if report.ok else f"{len(report.problems)} problem(s)"
    line = (
        f"audit log {state}: {report.records} records up to seq {report.last_seq}, "
        f"{report.checkpoints} checkpoints ({how})"
    )
    if report.unverified_after is not None:
        line += f"; records after seq {report.unverified_after} are not yet under a checkpoint"
    print(line)


@audit_app.command("tail")
def tail(
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many records to show.")] = 20,
    follow_: Annotated[
        bool, typer.Option("-f", "--follow", help="Then wait for new ones.")
    ] = False,
    principal: PrincipalOption = None,
    sandbox: SandboxOption = None,
    action: ActionOption = None,
    as_json: JsonOption = False,
) -> None:
    """The last N records (and, with -f, each new one as it is written)."""
    from collections import deque

    from warden.audit import follow, records

    try:
        if follow_:
            found: Iterable[dict[str, Any]] = follow(
                _home(), principal=principal, sandbox=sandbox, action=action, last=lines
            )
        else:
            found = deque(
                records(_home(), principal=principal, sandbox=sandbox, action=action),
                maxlen=lines,
            )
        _show(found, as_json)
    except WardenError as exc:
        raise warden_exit(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@audit_app.command("search")
def search(
    principal: PrincipalOption = None,
    sandbox: SandboxOption = None,
    action: ActionOption = None,
    since: SinceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every record that matches all the filters given, oldest first."""
    from warden.audit import parse_since, records

    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None
    try:
        _show(
            records(_home(), principal=principal, sandbox=sandbox, action=action, since=start),
            as_json,
        )
    except WardenError as exc:
        raise warden_exit(exc) from None


def _show(found: Iterable[dict[str, Any]], as_json: bool) -> None:
    for rec in found:
        print(json.dumps(rec, sort_keys=True) if as_json else format_record(rec), flush=True)


def format_record(rec: dict[str, Any]) -> str:
    """One line: time (UTC), seq, principal, action, sandbox, outcome, then the other fields
    (digests shortened to 12 hex digits)."""
    when = rec.get("time")
    stamp = (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        if isinstance(when, int | float)
        else "?"
    )
    head = [
        stamp,
        f"#{rec.get('seq')}",
        str(rec.get("principal")),
        str(rec.get("action")),
        str(rec.get("sandbox") or "-"),
        str(rec.get("outcome")),
    ]
    extra = [f"{k}={_short(v)}" for k, v in sorted(rec.items()) if k not in _CORE]
    return "  ".join(head + extra)


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "…"
    return text if " " not in text else json.dumps(text)


__all__ = ["audit_app", "format_record"]
