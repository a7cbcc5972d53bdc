"""CLI commands that talk to the manager daemon: create, ps, inspect, exec, cp, pause, resume,
stop, rm, logs, info.

The daemon is found by ``--host`` or ``$WARDEN_HOST``: a unix socket path (``unix:///path`` or
``/path``) or an ``http://host:port`` URL; by default ``$WARDEN_HOME/api/warden.sock``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import stat as stat_mod
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from warden._errors import CommandTimeoutError, SpecError, WardenError
from warden.cli._console import err, out

if TYPE_CHECKING:
    import httpx

    from warden.agent.client import ExecResult
    from warden.sdk._endpoint import Endpoint
    from warden.sdk._remote import Client

# httpx, rich and the SDK's remote client load in the commands that contact a daemon: every
# other command (``warden run`` above all) must not pay ~0.3 s for them (issue 8).

EXIT_WARDEN_ERROR = 125

UserOption = Annotated[
    str,
    typer.Option(
        "--user",
        "-u",
        help='The guest user: "user" (uid 1000) or "root" (a daemon must allow it).',
    ),
]

HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="WARDEN_HOST",
        help="The daemon: a unix socket path or http://host:port [default: the local socket].",
    ),
]


RequireJailOption = Annotated[
    bool,
    typer.Option(
        "--require-jail",
        help="Have the daemon refuse the create (nothing is recorded) unless QEMU gets every "
        "jail feature on its host (`warden doctor` there lists them); without it a missing "
        "feature is a logged downgrade.",
    ),
]


def _fail(message: str) -> NoReturn:
    from rich.markup import escape  # a message may quote TOML ([[rules]]), not markup

    err().print(f"[red]warden:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(EXIT_WARDEN_ERROR)


def _endpoint(host: str | None) -> Endpoint:
    from warden.sdk._endpoint import Endpoint

    try:
        return Endpoint.resolve(host)
    except SpecError as exc:
        _fail(str(exc))


@contextmanager
def _client(host: str | None) -> Iterator[httpx.Client]:
    import httpx

    endpoint = _endpoint(host)
    try:
        with endpoint.sync_client(httpx.Timeout(60.0, read=None)) as client:
            yield client
    except httpx.TransportError as exc:
        _fail(endpoint.unreachable(exc))


@contextmanager
def _sdk(host: str | None) -> Iterator[Client]:
    """The SDK's client of the daemon at ``host``; an error it raises ends the command with
    its message (the class tells the SDK's callers apart; the CLI prints it)."""
    from warden.sdk._remote import Client

    try:
        yield Client(_endpoint(host))
    except WardenError as exc:
        _fail(str(exc))


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
    from warden.api import errors as api_errors

    _fail(api_errors.parse(response.status_code, response.content).text())


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
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Clone this template (`warden template list`): it has the template's image, "
            "memory and vCPUs.",
        ),
    ] = None,
    host: HostOption = None,
    require_jail: RequireJailOption = False,
) -> None:
    """Create a sandbox that outlives this command; print its id."""
    labels = _labels(label or [])
    with _sdk(host) as client:
        sbx = client.Sandbox.create(
            image,
            memory_mib=memory,
            vcpus=cpus,
            name=name,
            labels=labels,
            template=template,
            require_jail=require_jail,
        )
    print(sbx.id)  # the sandbox outlives this command: it is not closed


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
    with _sdk(host) as client:
        vms = client.list(all=all)
    if format == "json":
        print(json.dumps(vms, indent=2))
        return
    from rich.table import Table

    table = Table(box=None)
    for col in ("ID", "NAME", "OWNER", "STATE", "UPTIME", "MEMORY", "CPUS", "CPU%", "IMAGE"):
        table.add_column(col, justify="right" if col == "CPU%" else "left")
    for vm in vms:
        cpu = vm.get("cpu_percent")
        table.add_row(
            vm["id"],
            vm["name"] or "-",
            vm.get("owner") or "-",
            "running (idle-paused)" if vm.get("idle_paused") else vm["state"],
            _uptime(vm["uptime_s"]),
            f"{vm['memory_mib']} MiB",
            str(vm["vcpus"]),
            "-" if cpu is None else f"{cpu:.1f}",
            vm["image"],
        )
    out().print(table)


def inspect(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Show everything known about one sandbox, as JSON."""
    with _sdk(host) as client:
        vm = client.inspect(ref)
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
    user: UserOption = "user",
    host: HostOption = None,
) -> None:
    """Run CMD in a sandbox, stream its output, and exit with its exit code."""
    if cmd and cmd[0] == "--":  # options end at ID, so click hands the "--" through
        cmd = cmd[1:]
    if not cmd:
        raise typer.BadParameter("give the command after --", param_hint="CMD")
    import httpx

    endpoint = _endpoint(host)
    try:
        result = asyncio.run(
            _exec(
                endpoint,
                ref,
                cmd,
                _labels(env) if env else None,
                cwd,
                timeout,
                interactive,
                user,
            )
        )
    except CommandTimeoutError:
        err().print(f"[red]warden:[/red] the command passed its timeout of {timeout}s")
        raise typer.Exit(124) from None
    except httpx.TransportError as exc:
        _fail(endpoint.unreachable(exc))
    except WardenError as exc:
        _fail(str(exc))
    if result.exit_code is not None:
        raise typer.Exit(result.exit_code)
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)
    _fail("the daemon ended the output without a result")


async def _exec(
    endpoint: Endpoint,
    ref: str,
    cmd: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    interactive: bool,
    user: str,
) -> ExecResult:
    """Run ``cmd`` through the daemon with the SDK's remote agent, output straight through
    (none of it is kept: a command may write without end)."""
    import httpx

    from warden.sdk._lines import RecordPool
    from warden.sdk._remote import RemoteAgent

    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer

    def write(stream: IO[bytes]) -> Callable[[bytes], None]:
        def to(chunk: bytes) -> None:
            stream.write(chunk)
            stream.flush()

        return to

    lines = RecordPool(endpoint)
    async with endpoint.async_client(httpx.Timeout(60.0, read=None)) as http:
        try:
            return await RemoteAgent(http, lines, ref).exec(
                cmd,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=_stdin_chunks() if interactive else None,
                on_stdout=write(stdout),
                on_stderr=write(stderr),
                user=user,
                max_output=0,
            )
        finally:
            await lines.aclose()


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """This process's stdin, as it comes (a pipe, a file or a terminal).

    Read by a daemon thread: a blocking read of a terminal must not keep the CLI alive after
    the command has ended.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    fd = sys.stdin.fileno()

    def pump() -> None:
        while True:
            chunk = os.read(fd, STDIN_CHUNK)
            try:
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the command has ended and its loop with it
            if not chunk:
                return

    threading.Thread(target=pump, name="warden-stdin", daemon=True).start()
    while chunk := await queue.get():
        yield chunk


STDIN_CHUNK = 64 * 1024


CP_CHUNK = 1024 * 1024
"""Bytes read from a local file per step of `warden cp` (it never holds a whole file)."""


def _split_ref(arg: str) -> tuple[str | None, str]:
    """``ID:PATH`` -> (ID, PATH); a local path (``/x``, ``./x``, ``-``, no colon) -> (None, arg)."""
    if arg == "-" or arg.startswith(("/", ".", "~")):
        return None, arg
    ref, sep, path = arg.partition(":")
    if sep and ref and "/" not in ref:
        return ref, path
    return None, arg


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CP_CHUNK):
        yield chunk


def cp(
    src: Annotated[str, typer.Argument(help="A local path, or ID:PATH in a sandbox; - is stdin.")],
    dst: Annotated[str, typer.Argument(help="ID:PATH in a sandbox, or a local path; - is stdout.")],
    max_size: Annotated[
        str,
        typer.Option(
            "--max-size",
            help="Copying out: refuse a file larger than this (bytes, or with K, M, G, T); "
            "0 for no limit.",
        ),
    ] = "1G",
    user: UserOption = "user",
    host: HostOption = None,
) -> None:
    """Copy a file into a sandbox (SRC ID:DST) or out of one (ID:SRC DST), streamed.

    A DST ending in / (or an existing local directory) gets SRC's file name. A file copied out
    keeps its holes (zero runs are not written), appears only once complete (never a partial
    file, even after Ctrl-C or SIGTERM) and is made with mode 0600.
    """
    src_ref, src_path = _split_ref(src)
    dst_ref, dst_path = _split_ref(dst)
    if (src_ref is None) == (dst_ref is None):
        raise typer.BadParameter(
            "exactly one of SRC and DST must be ID:PATH (a path in a sandbox)", param_hint="SRC DST"
        )
    if not (src_path and dst_path):
        raise typer.BadParameter("give a path after ID:", param_hint="SRC DST")
    limit = parse_size(max_size)
    if dst_ref is not None:
        _upload(src_path, dst_ref, dst_path, user, host)
    else:
        assert src_ref is not None
        _download(src_ref, src_path, dst_path, limit or None, user, host)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``10M`` -> 10485760 (binary units; an optional trailing B or iB)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit():
        raise typer.BadParameter(
            f"{text!r} is not a size: give bytes, or a number with K, M, G or T (e.g. 512M)",
            param_hint="'--max-size'",
        )
    return int(number) * _UNITS[unit]


def _upload(local: str, ref: str, path: str, user: str, host: str | None) -> None:
    if path.endswith("/"):
        if local == "-":
            raise typer.BadParameter("name the file to write stdin to", param_hint="DST")
        path += os.path.basename(local.rstrip("/"))
    try:
        f = sys.stdin.buffer if local == "-" else open(local, "rb")  # noqa: SIM115
    except OSError as exc:
        _fail(f"cannot read {local}: {exc.strerror}")
    try:
        st = os.fstat(f.fileno())
        if stat_mod.S_ISDIR(st.st_mode):
            _fail(f"{local} is a directory; warden cp copies one file at a time")
        mode = stat_mod.S_IMODE(st.st_mode) if stat_mod.S_ISREG(st.st_mode) else 0o644
        import httpx

        with _client(host) as c:
            _check(
                c.put(
                    f"/v1/sandboxes/{ref}/files",
                    params={"path": path, "mode": mode, "user": user},
                    content=_file_chunks(f),
                    timeout=httpx.Timeout(60.0, read=None, write=None),
                )
            )
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _download(
    ref: str, path: str, local: str, max_size: int | None, user: str, host: str | None
) -> None:
    if local != "-" and (local.endswith("/") or os.path.isdir(local)):
        local = os.path.join(local, os.path.basename(path.rstrip("/")))
    import httpx

    endpoint = _endpoint(host)
    try:
        asyncio.run(_copy_out(endpoint, ref, path, local, max_size, user))
    except httpx.TransportError as exc:
        _fail(endpoint.unreachable(exc))
    except WardenError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {local}: {exc.strerror or exc}")
    except asyncio.CancelledError:
        err().print("[red]warden:[/red] cp was stopped (SIGTERM); nothing was kept")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        err().print("[red]warden:[/red] cp was interrupted; nothing was kept")
        raise typer.Exit(128 + signal.SIGINT) from None


async def _copy_out(
    endpoint: Endpoint, ref: str, path: str, local: str, max_size: int | None, user: str
) -> None:
    """Stream ``path`` out of sandbox ``ref`` into ``local`` (or stdout for ``-``) with the
    SDK's bounded, sparse, all-or-nothing download. SIGTERM cancels it like Ctrl-C does."""
    import httpx

    from warden.sdk import _download as _download_mod
    from warden.sdk._lines import RecordPool
    from warden.sdk._remote import RemoteAgent

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    lines = RecordPool(endpoint)
    try:
        async with endpoint.async_client(httpx.Timeout(60.0, read=None)) as http:
            agent = RemoteAgent(http, lines, ref)
            if max_size is not None:
                size = (await agent.stat(path, user=user)).size
                if size > max_size:
                    raise _download_mod.too_large(path, size, max_size)
            chunks = agent.read_file(path, user=user)
            if local != "-":
                await _download_mod.download(chunks, path, local, max_size)
                return
            async for chunk in _download_mod.bounded(chunks, path, max_size):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await lines.aclose()


def fork(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name of a running sandbox.")],
    n: Annotated[int, typer.Option("-n", help="How many children (1 to 16).")] = 1,
    host: HostOption = None,
) -> None:
    """Start N children of a running sandbox that carry on from its state (files and
    processes) and share its memory; print their ids. The sandbox keeps running."""
    with _sdk(host) as client:
        children = client.fork(ref, n)
    for child in children:
        print(child["id"])


def stop(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Stop a sandbox (it stays listed with --all until rm)."""
    with _sdk(host) as client:
        vm = client.stop(ref)
    print(vm["id"])


def pause(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Pause a running sandbox: its memory and files are saved to disk and its QEMU ends
    (its RAM is freed); `warden resume` starts it again where it was."""
    with _sdk(host) as client:
        vm = client.pause(ref)
    print(vm["id"])


def resume(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    host: HostOption = None,
) -> None:
    """Resume a paused sandbox from its saved state (refused if that state was altered)."""
    with _sdk(host) as client:
        vm = client.resume(ref)
    print(vm["id"])


def rm(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    force: Annotated[bool, typer.Option("-f", "--force", help="Kill it if it runs.")] = False,
    host: HostOption = None,
) -> None:
    """Remove a sandbox; a running one only with -f."""
    with _sdk(host) as client:
        client.remove(ref, force=force)
    print(ref)


def logs(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Id or name.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines.")] = 100,
    host: HostOption = None,
) -> None:
    """Print the tail of a sandbox's console."""
    with _sdk(host) as client:
        text = client.logs(ref, lines=lines)
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def info(host: HostOption = None) -> None:
    """Show the host's capacity, the overcommit ratios and the reservations."""
    with _sdk(host) as client:
        data = client.info()
    print(json.dumps(data, indent=2))


def register(app: typer.Typer) -> None:
    app.command("create")(create)
    app.command("ps")(ps)
    app.command("inspect")(inspect)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
    app.command("cp")(cp)
    app.command("fork")(fork)
    app.command("stop")(stop)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("rm")(rm)
    app.command("logs")(logs)
    app.command("info")(info)
