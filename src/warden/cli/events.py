"""``warden events [--vm ID] [--follow]``: the VMs' lifecycle events, from the daemon.

Each line is ``TIME  VM-ID  KIND  DETAIL`` (or the event as JSON with ``--format json``).
Kinds: ``created``, the states ``running``, ``stopping``, ``stopped``, ``failed``, and
``removed``. ``--follow`` keeps polling ``GET /v1/events?after=N`` for new ones until
interrupted.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from warden.cli._console import out
from warden.cli.remote import HostOption, _check, _client, _fail

POLL_S = 0.5


def _print(event: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        out().print(json.dumps(event, separators=(",", ":")), highlight=False, soft_wrap=True)
        return
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(event["at"])))
    detail = " ".join(f"{k}={v}" for k, v in event.get("detail", {}).items() if v is not None)
    out().print(
        f"{at}  {event['vm_id']}  {event['kind']:<9} {detail}".rstrip(),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def events(
    vm: Annotated[
        str | None, typer.Option("--vm", help="Only this VM's events (id or name).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new events as they happen.")
    ] = False,
    since: Annotated[
        int, typer.Option("--since", help="Only events with an id above this.", min=0)
    ] = 0,
    fmt: Annotated[str, typer.Option("--format", help="table or json (one a line).")] = "table",
    host: HostOption = None,
) -> None:
    """Print the VMs' lifecycle events; with --follow, keep printing new ones."""
    if fmt not in ("table", "json"):
        _fail(f"--format must be table or json (got {fmt!r})")
    after = since
    params: dict[str, Any] = {"vm": vm} if vm else {}
    with _client(host) as c:
        try:
            while True:
                batch = _check(c.get("/v1/events", params={**params, "after": after}))
                for event in batch or []:
                    _print(event, fmt)
                    after = max(after, int(event["id"]))
                out().file.flush()
                if not follow:
                    return
                if not batch:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            return
