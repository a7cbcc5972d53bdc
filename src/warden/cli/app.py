"""The ``warden`` command line."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from warden._errors import CommandTimeoutError, WardenError
from warden.cli.doctor import doctor
from warden.cli.events import events
from warden.cli.image import image_app
from warden.cli.remote import HostOption, UserOption
from warden.cli.remote import register as register_remote
from warden.cli.serve import serve
from warden.wire.ops import DEFAULT_USER

if TYPE_CHECKING:
    from warden.sdk import Client

app = typer.Typer(
    name="warden",
    help="Run code you don't trust in isolated microVMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(image_app, name="image", help="Build, list and remove guest images.")
app.command("doctor", help="Check QEMU, kernel, image and accelerator; say how to fix problems.")(
    doctor
)
app.command("serve")(serve)
app.command("events")(events)
register_remote(app)

err = Console(stderr=True)

EXIT_WARDEN_ERROR = 125
EXIT_TIMEOUT = 124

RequireJailOption = Annotated[
    bool,
    typer.Option(
        "--require-jail",
        help="Refuse to boot unless QEMU gets every jail feature (own uid, namespaces, "
        "seccomp, no_new_privs, cgroups; `warden doctor` lists them). The VM then runs in "
        "this process, which checks its own jail; a daemon enforces it with "
        "`warden serve --require-jail`.",
    ),
]


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="'-e'")
        env[key] = value
    return env


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    cmd: Annotated[list[str], typer.Argument(help="The command and its arguments, after --.")],
    image: Annotated[str, typer.Option("--image", help="Guest image name.")] = "default",
    memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 256,
    cpus: Annotated[int, typer.Option("--cpus", help="Number of vCPUs.")] = 1,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Kill the command after S seconds.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE for the command.")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive", help="Forward stdin to the command.")
    ] = False,
    shell: Annotated[
        bool, typer.Option("--shell", help="Run CMD as one /bin/sh -c string.")
    ] = False,
    cold: Annotated[
        bool, typer.Option("--cold", help="Boot from scratch, not from the boot snapshot.")
    ] = False,
    user: UserOption = "user",
    host: HostOption = None,
    require_jail: RequireJailOption = False,
) -> None:
    """Boot a VM, run CMD in it, stream its output, and exit with CMD's exit code.

    The VM is destroyed afterwards. It runs on the warden daemon when one answers on --host /
    WARDEN_HOST (then it must) or the local socket, and embedded in this process otherwise
    (always with --cold, which only embedded mode offers unless --host is given).
    Example: warden run -- python3 -c 'print(1)'
    """
    env_map = _parse_env(env or [])
    if require_jail:
        _require_jail(host)
    stdin = sys.stdin.buffer.read() if interactive else None
    command: str | list[str] = " ".join(cmd) if shell else cmd
    try:
        client = None if require_jail else _daemon_for_run(host, cold)
        code = asyncio.run(
            _run(
                command,
                image,
                memory,
                cpus,
                timeout,
                env_map,
                stdin,
                "cold" if cold else "snapshot",
                client,
                user,
            )
        )
    except CommandTimeoutError as exc:
        err.print(f"[red]warden:[/red] {exc}")
        raise typer.Exit(EXIT_TIMEOUT) from None
    except WardenError as exc:
        err.print(f"[red]warden:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(EXIT_WARDEN_ERROR) from None
    raise typer.Exit(code)


async def _run(
    command: str | list[str],
    image: str,
    memory: int,
    cpus: int,
    timeout: float | None,
    env: dict[str, str],
    stdin: bytes | None,
    boot: str,
    client: Client | None = None,
    user: str = DEFAULT_USER,
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
    async with await create(image, memory_mib=memory, vcpus=cpus, boot=boot) as sbx:
        # Raw bytes straight through: the CLI must pass binary output unchanged. None of it
        # is kept (max_output=0): a command may write without end.
        result = await sbx._agent().exec(
            command,
            env=env,
            stdin=stdin,
            timeout=timeout,
            on_stdout=write_out,
            on_stderr=write_err,
            user=user,
            max_output=0,
        )
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 0)


def _require_jail(host: str | None) -> None:
    """Every VM of this process must get the whole jail; a remote daemon's cannot be checked."""
    from warden.jail.policy import set_default_mode

    if host:
        raise typer.BadParameter(
            "cannot check the jail of a daemon's host from here: start that daemon with "
            "`warden serve --require-jail`, or leave out --host",
            param_hint="'--require-jail'",
        )
    set_default_mode("require")


def _daemon_for_run(host: str | None, cold: bool) -> Client | None:
    """The daemon `warden run` uses: the given host (which must answer), else the local
    socket's daemon if one answers (and --cold is not asked for), else None (embedded)."""
    from warden.sdk._endpoint import default_url
    from warden.sdk._remote import connect, daemon_answers

    if host:
        return connect(host)
    if not cold and daemon_answers(default_url()):
        return connect(default_url())
    return None


def main() -> None:
    app()
