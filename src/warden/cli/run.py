"""``warden run``: boot a VM, run one command in it, stream its output, exit with its code.

Shared by the typer command (``cli/app.py``) and the hand-parsed fast path (``cli/main.py``):
neither typer, rich nor the remote client load here unless they are needed, so that
``warden run -- true`` spends little in warden's own code outside the VM (issue 8, "fast
everywhere else"; ``bench/run.py --only cli`` measures it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from warden._errors import CommandTimeoutError, WardenError
from warden.wire.ops import DEFAULT_USER

if TYPE_CHECKING:
    from warden.sdk import Client

EXIT_WARDEN_ERROR = 125
EXIT_TIMEOUT = 124


@dataclass(frozen=True)
class RunArgs:
    """What ``warden run`` was asked, its options' defaults being the typer command's."""

    cmd: list[str]
    image: str = "default"
    memory: int = 256
    cpus: int = 1
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    interactive: bool = False
    shell: bool = False
    cold: bool = False
    template: str | None = None
    user: str = "user"
    host: str | None = None
    require_jail: bool = False


def run_command(args: RunArgs) -> int:
    """Run ``args`` and return the exit code: the command's, 124 on its timeout, 125 if warden
    failed (then the reason is on stderr). ``--require-jail`` with ``--host`` is the caller's
    to refuse."""
    if args.require_jail:
        from warden.jail.policy import set_default_mode

        set_default_mode("require")
    stdin = sys.stdin.buffer.read() if args.interactive else None
    command: str | list[str] = " ".join(args.cmd) if args.shell else args.cmd
    try:
        client = None if args.require_jail else daemon_for_run(args.host, args.cold)
        return asyncio.run(_run(args, command, stdin, client))
    except CommandTimeoutError as exc:
        _print_error(str(exc))
        return EXIT_TIMEOUT
    except WardenError as exc:
        _print_error(str(exc))
        return EXIT_WARDEN_ERROR


def _print_error(message: str) -> None:
    from warden.cli._console import err

    err().print(f"[red]warden:[/red] {message}", markup=True, highlight=False)


async def _run(
    args: RunArgs, command: str | list[str], stdin: bytes | None, client: Client | None
) -> int:
    from warden.sdk import AsyncSandbox

    out, errout = sys.stdout.buffer, sys.stderr.buffer

    def write_out(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    def write_err(chunk: bytes) -> None:
        errout.write(chunk)
        errout.flush()

    create = client.AsyncSandbox.create if client is not None else AsyncSandbox.create
    boot = "cold" if args.cold else "snapshot"
    sandbox = create(
        args.image, memory_mib=args.memory, vcpus=args.cpus, boot=boot, template=args.template
    )
    async with await sandbox as sbx:
        # Raw bytes straight through: the CLI must pass binary output unchanged. None of it
        # is kept (max_output=0): a command may write without end.
        result = await sbx._agent().exec(
            command,
            env=args.env,
            stdin=stdin,
            timeout=args.timeout,
            on_stdout=write_out,
            on_stderr=write_err,
            user=args.user or DEFAULT_USER,
            max_output=0,
        )
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 0)


def daemon_for_run(host: str | None, cold: bool) -> Client | None:
    """The daemon `warden run` uses: the given host (which must answer), else the local
    socket's daemon if one answers (and --cold is not asked for), else None (embedded).

    The remote client (httpx) loads only when there is a daemon to ask: without a socket
    file, embedded mode starts without it (~0.2 s less; issue 8)."""
    from warden.sdk._endpoint import Endpoint, default_url

    if not host and cold:
        return None
    if not host:
        uds = Endpoint.resolve(default_url()).socket_path
        if uds is not None and not os.path.exists(uds):
            return None
    from warden.sdk._remote import connect, daemon_answers

    if host:
        return connect(host)
    if daemon_answers(default_url()):
        return connect(default_url())
    return None
