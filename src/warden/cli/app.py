"""The ``warden`` command line: the typer app (``warden.cli.main`` is the entry point)."""

from __future__ import annotations

from typing import Annotated

import typer

from warden.cli.audit import audit_app
from warden.cli.doctor import doctor
from warden.cli.events import events
from warden.cli.image import image_app
from warden.cli.link import link_app
from warden.cli.policy import policy_app
from warden.cli.remote import HostOption, UserOption
from warden.cli.remote import register as register_remote
from warden.cli.run import EXIT_TIMEOUT, EXIT_WARDEN_ERROR, RunArgs, run_command
from warden.cli.serve import serve
from warden.cli.template import template_app
from warden.cli.token import token_app

app = typer.Typer(
    name="warden",
    help="Run code you don't trust in isolated microVMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(image_app, name="image", help="Build, list and remove guest images.")
app.add_typer(template_app, name="template", help="Make, list and remove templates.")
app.add_typer(link_app, name="link", help="Link two sandboxes (a stream between them).")
app.add_typer(policy_app, name="policy", help="Check and reload the access policy.")
app.add_typer(token_app, name="token", help="Make, list and revoke API tokens.")
app.add_typer(audit_app, name="audit", help="Check and read the tamper-evident audit log.")
app.command("doctor", help="Check QEMU, kernel, image and accelerator; say how to fix problems.")(
    doctor
)
app.command("serve")(serve)
app.command("events")(events)
register_remote(app)

__all__ = ["EXIT_TIMEOUT", "EXIT_WARDEN_ERROR", "app", "main"]

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
        bool,
        typer.Option("--cold", help="Boot from scratch, not as a clone of the boot template."),
    ] = False,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Clone this template instead of booting an image."),
    ] = None,
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
    if require_jail and host:
        raise typer.BadParameter(
            "cannot check the jail of a daemon's host from here: start that daemon with "
            "`warden serve --require-jail`, or leave out --host",
            param_hint="'--require-jail'",
        )
    args = RunArgs(
        cmd=cmd,
        image=image,
        memory=memory,
        cpus=cpus,
        timeout=timeout,
        env=_parse_env(env or []),
        interactive=interactive,
        shell=shell,
        cold=cold,
        template=template,
        user=user,
        host=host,
        require_jail=require_jail,
    )
    raise typer.Exit(run_command(args))


def main() -> None:
    app()
