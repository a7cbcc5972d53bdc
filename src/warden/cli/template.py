"""``warden template create|list|rm``: templates, the VMs that clones start from.

Like ``warden run``, each command uses the warden daemon when one answers (``--host`` /
``WARDEN_HOST``, or the local socket) and this host's ``$WARDEN_HOME`` otherwise. A template is
a file store either way: a daemon's templates are the ones in its ``$WARDEN_HOME``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from warden._errors import WardenError
from warden.cli._console import out, warden_exit
from warden.cli.remote import HostOption, UserOption

if TYPE_CHECKING:
    from warden.sdk import Client

template_app = typer.Typer(
    help="Make, list and remove templates: saved VMs that clones start from in a fraction "
    "of a boot, sharing their memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _daemon(host: str | None) -> Client | None:
    from warden.cli.run import daemon_for_run

    return daemon_for_run(host, cold=False)


@template_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The template's name: [a-z0-9][a-z0-9_-]*.")],
    source: Annotated[
        str | None,
        typer.Option("--from", help="Save this running sandbox (id or name) of the daemon."),
    ] = None,
    image: Annotated[str, typer.Option("--image", help="Guest image name.")] = "default",
    memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 256,
    cpus: Annotated[int, typer.Option("--cpus", help="Number of vCPUs.")] = 1,
    run: Annotated[
        str | None,
        typer.Option("--run", help="A /bin/sh -c line that prepares the VM first (exit 0)."),
    ] = None,
    user: UserOption = "user",
    host: HostOption = None,
) -> None:
    """Boot a VM (or take a running sandbox with --from), optionally run a setup command in
    it, and save it as template NAME. Then: `warden create --template NAME`."""
    from warden.vmm.templates import check_name

    try:
        check_name(name)
        client = _daemon(host)
        started = time.monotonic()
        if source is not None:
            _from_sandbox(client, source, name, run, user)
        else:
            _from_image(client, name, image, memory, cpus, run, user)
    except WardenError as exc:
        raise warden_exit(exc) from None
    out().print(f"template {name} saved in {time.monotonic() - started:.1f}s")


def _from_sandbox(
    client: Client | None, source: str, name: str, run: str | None, user: str
) -> None:
    if client is None:
        raise typer.BadParameter(
            "--from takes a sandbox of the warden daemon, and none answers: start one "
            "(`warden serve`) or give --host",
            param_hint="'--from'",
        )
    if run is not None:
        raise typer.BadParameter(
            "--run prepares a VM booted for the template; run the command in the sandbox "
            "first (`warden exec`), then save it with --from",
            param_hint="'--run'",
        )
    client.save_template(source, name)


def _from_image(
    client: Client | None,
    name: str,
    image: str,
    memory: int,
    cpus: int,
    run: str | None,
    user: str,
) -> None:
    import warden

    # A clone of the boot template of this shape (the first one boots cold and makes it).
    factory: Any = client.Sandbox if client is not None else warden.Sandbox
    with factory.create(image, memory_mib=memory, vcpus=cpus) as sbx:
        if run is not None:
            result = sbx.commands.run(run, user=user, timeout=None)
            if result.exit_code != 0:
                raise typer.BadParameter(
                    f"the setup command exited with {result.exit_code}; nothing was saved. "
                    f"Its stderr: {result.stderr[-2000:]!r}",
                    param_hint="'--run'",
                )
        sbx.save_template(name)


@template_app.command("list")
def list_(
    host: HostOption = None,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all", help="Also the automatic boot templates (_boot-IMAGE-MEMm-CPUSc-ACCEL)."
        ),
    ] = False,
) -> None:
    """List the templates: name, image, memory, vCPUs, size on disk, age, and whether a clone
    of it would be refused (its seal, image or QEMU changed)."""
    from rich.table import Table

    try:
        client = _daemon(host)
        rows = client.templates(all=show_all) if client is not None else _local_templates(show_all)
    except WardenError as exc:
        raise warden_exit(exc) from None
    table = Table(box=None)
    for column in ("NAME", "IMAGE", "MEMORY", "CPUS", "DISK", "AGE", "SOURCE", "STATUS"):
        table.add_column(column)
    now = time.time()
    for t in rows:
        table.add_row(
            t["name"],
            t["image"],
            f"{t['memory_mib']}M",
            str(t["vcpus"]),
            f"{t['disk_bytes'] / (1 << 20):.0f}M",
            f"{max(0, now - t['created']) / 60:.0f}m",
            t.get("source") or ("automatic" if t.get("automatic") else "-"),
            "ok" if not t.get("problem") else f"refused: {t['problem']}",
        )
    out().print(table)


def _local_templates(show_all: bool) -> list[dict[str, Any]]:
    import dataclasses

    from warden.config import Paths
    from warden.vmm.templates import Templates

    infos = Templates(Paths.from_env()).list(automatic=show_all)
    return [dataclasses.asdict(info) for info in infos]


@template_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="The template to remove.")],
    host: HostOption = None,
) -> None:
    """Remove a template. Clones made from it keep running."""
    try:
        client = _daemon(host)
        if client is not None:
            client.remove_template(name)
        else:
            from warden.config import Paths
            from warden.vmm.templates import Templates

            Templates(Paths.from_env()).remove(name)
    except WardenError as exc:
        raise warden_exit(exc) from None
