"""CLI commands that talk to the manager daemon: create, ps, inspect, exec, stop, rm, logs, info.

The daemon is found by ``--host`` or ``$WARDEN_HOST``: a unix socket path (``unix:///path`` or
``/path``) or an ``http://host:port`` URL; by default ``$WARDEN_HOME/run/warden.sock``.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from warden.cli.serve import default_socket

out = Console()
err = Console(stderr=True)

EXIT_WARDEN_ERROR = 125

HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="WARDEN_HOST",
        help="The daemon: a unix socket path or http://host:port [default: the local socket].",
    ),
]


def _fail(message: str) -> NoReturn:
    err.print(f"[red]warden:[/red] {message}", highlight=False)
    raise typer.Exit(EXIT_WARDEN_ERROR)


@contextmanager
def _client(host: str | None) -> Iterator[httpx.Client]:
    target = host or str(default_socket())
    if target.startswith(("http://", "https://")):
        client = httpx.Client(base_url=target, timeout=httpx.Timeout(60.0, read=None))
    else:
        path = target.removeprefix("unix://")
        transport = httpx.HTTPTransport(uds=path)
        client = httpx.Client(
            transport=transport, base_url="http://warden", timeout=httpx.Timeout(60.0, read=None)
        )
    try:
        with client:
            yield client
    except httpx.TransportError as exc:
        _fail(
            f"no warden daemon answers at {target} ({exc}). Start one with `warden serve` "
            "(or point --host / WARDEN_HOST at a running one)."
        )


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # a 422 from validation: one line per problem
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail
        )
    _fail(f"{detail} (HTTP {response.status_code})")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not k=v", param_hint="'--label'")
        labels[key] = value
    return labels


def create(
    name: Annotated[str | None, typer.Option("--name", help="A unique name.")] = None,
    image: Annotated[str, typer.Option("--image", help="Guest image name.")] = "default",
    memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 256,
    cpus: Annotated[int, typer.Option("--cpus", help="Number of vCPUs.")] = 1,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="k=v, may be repeated.")
    ] = None,
    host: HostOption = None,
) -> None:
    """Create a sandbox that outlives this command; print its id."""
    body: dict[str, Any] = {
        "image": image,
        "memory_mib": memory,
        "vcpus": cpus,
        "labels": _labels(label or []),
    }
    if name is not None:
        body["name"] = name
    with _client(host) as c:
        vm = _check(c.post("/v1/sandboxes", json=body, timeout=httpx.Timeout(300.0)))
    print(vm["id"])


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def ps(
    all: Annotated[bool, typer.Option("--all", "-a", help="Also stopped and failed ones.")] = False,
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    host: HostOption = None,
) -> None:
    """List sandboxes."""
    with _client(host) as c:
        vms = _check(c.get("/v1/sandboxes", params={"all": str(all).lower()}))
    if format == "json":
        print(json.dumps(vms, indent=2))
        return
    table = Table(box=None)
    for col in ("ID", "NAME", "STATE", "UPTIME", "MEMORY", "CPUS", "IMAGE"):
        table.add_column(col)
    for vm in vms:
        table.add_row(
            vm["id"],
            vm["name"] or "-",
            vm["state"],
            _uptime(vm["uptime_s"]),
            f"{vm['memory_mib']} MiB",
            str(vm["vcpus"]),
            vm["image"],
        )
    out.print(table)


def inspect(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Show everything known about one sandbox, as JSON."""
    with _client(host) as c:
        vm = _check(c.get(f"/v1/sandboxes/{ref}"))
    print(json.dumps(vm, indent=2))


def exec_(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    cmd: Annotated[list[str], typer.Argument(help="The command and its arguments, after --.")],
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE for the command.")
    ] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory.")] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Kill the command after S seconds.")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive", help="Forward stdin to the command.")
    ] = False,
    host: HostOption = None,
) -> None:
    """Run CMD in a sandbox, stream its output, and exit with its exit code."""
    if cmd and cmd[0] == "--":  # options end at ID, so click hands the "--" through
        cmd = cmd[1:]
    if not cmd:
        raise typer.BadParameter("give the command after --", param_hint="CMD")
    body: dict[str, Any] = {"cmd": cmd}
    if env:
        body["env"] = _labels(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    if interactive:
        body["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    final: dict[str, Any] = {}
    with _client(host) as c, c.stream("POST", f"/v1/sandboxes/{ref}/exec", json=body) as r:
        if not r.is_success:
            r.read()
            _check(r)
        for line in r.iter_lines():
            if not line:
                continue
            msg = json.loads(line)
            if "stdout" in msg:
                stdout.write(base64.b64decode(msg["stdout"]))
                stdout.flush()
            elif "stderr" in msg:
                stderr.write(base64.b64decode(msg["stderr"]))
                stderr.flush()
            else:
                final = msg
    if "error" in final:
        _fail(str(final["error"]))
    if final.get("timed_out"):
        err.print(f"[red]warden:[/red] the command passed its timeout of {timeout}s")
        raise typer.Exit(124)
    if final.get("exit_code") is not None:
        raise typer.Exit(int(final["exit_code"]))
    if final.get("signal") is not None:
        raise typer.Exit(128 + int(final["signal"]))
    _fail("the daemon ended the output without a result")


def stop(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Stop a sandbox (it stays listed with --all until rm)."""
    with _client(host) as c:
        vm = _check(c.post(f"/v1/sandboxes/{ref}/stop", timeout=httpx.Timeout(60.0)))
    print(vm["id"])


def rm(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    force: Annotated[bool, typer.Option("-f", "--force", help="Kill it if it runs.")] = False,
    host: HostOption = None,
) -> None:
    """Remove a sandbox; a running one only with -f."""
    with _client(host) as c:
        _check(c.delete(f"/v1/sandboxes/{ref}", params={"force": str(force).lower()}))
    print(ref)


def logs(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines.")] = 100,
    host: HostOption = None,
) -> None:
    """Print the tail of a sandbox's console."""
    with _client(host) as c:
        text = _check(c.get(f"/v1/sandboxes/{ref}/logs", params={"lines": lines}))
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def info(host: HostOption = None) -> None:
    """Show the host's capacity, the overcommit ratios and the reservations."""
    with _client(host) as c:
        data = _check(c.get("/v1/info"))
    print(json.dumps(data, indent=2))


def register(app: typer.Typer) -> None:
    app.command("create")(create)
    app.command("ps")(ps)
    app.command("inspect")(inspect)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
    app.command("stop")(stop)
    app.command("rm")(rm)
    app.command("logs")(logs)
    app.command("info")(info)
