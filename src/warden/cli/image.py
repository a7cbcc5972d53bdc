"""``warden image build|list|rm``: build, list and remove guest images."""

from __future__ import annotations

from typing import Annotated

import typer

from warden._errors import WardenError
from warden.cli._console import err, out
from warden.config import Paths

image_app = typer.Typer(
    help="Build, list and remove guest images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_ERROR = 1


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    return f"{n / 1024:.0f}K"


def _fail(exc: WardenError) -> typer.Exit:
    from rich.text import Text

    err().print(Text("warden: ", style="red") + Text(str(exc)))
    return typer.Exit(EXIT_ERROR)


@image_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="Recipe name.")] = "default",
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild every artifact, even when cached.")
    ] = False,
) -> None:
    """Build an image (kernel, initramfs, rootfs); reuse cached artifacts that still match."""
    from rich.progress import TaskID

    from warden.cli._progress import steps_progress
    from warden.image.build import StepEvent, build_image

    console = out()
    paths = Paths.from_env()

    if console.is_terminal:
        progress = steps_progress(console)
        room = max(10, console.width - 50)  # long details would squeeze the other columns
        tasks: dict[str, TaskID] = {}

        def on_step(ev: StepEvent) -> None:
            if ev.status == "start":
                tasks[ev.step] = progress.add_task(ev.title, total=1, status="running", detail="")
                return
            task = tasks[ev.step]
            detail = ev.detail if len(ev.detail) <= room else ev.detail[: room - 1] + "…"
            progress.update(task, completed=1, status=ev.status, detail=detail)
            progress.stop_task(task)

        try:
            with progress:
                image = build_image(paths, name, progress=on_step, force=force)
        except WardenError as exc:
            raise _fail(exc) from None
    else:

        def on_line(ev: StepEvent) -> None:
            if ev.status != "start":
                detail = f"  {ev.detail}" if ev.detail else ""
                console.print(
                    f"{ev.title:<28} {ev.status:<7} {ev.elapsed:6.1f}s{detail}",
                    highlight=False,
                    soft_wrap=True,
                )

        try:
            image = build_image(paths, name, progress=on_line, force=force)
        except WardenError as exc:
            raise _fail(exc) from None

    console.print(
        f"image [bold]{image.name}[/bold] ready: kernel {image.kernel_version}, "
        f"rootfs {_size(image.rootfs.size)}, recipe {image.recipe_hash}",
        highlight=False,
        soft_wrap=True,
    )


@image_app.command("list")
def list_() -> None:
    """List built images."""
    from rich.table import Table

    from warden.image.store import list_images

    images = list_images(Paths.from_env())
    console = out()
    if not images:
        console.print("no images built; run `warden image build default`")
        return
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for col in ("name", "kernel", "vmlinuz", "initrd", "rootfs", "built", "recipe"):
        table.add_column(col, no_wrap=True, min_width=len(col))
    for im in images:
        table.add_row(
            im.name,
            im.kernel_version,
            *(_size(a.size) for a in (im.kernel, im.initrd, im.rootfs)),
            im.built_at.replace("T", " ")[:16],
            im.recipe_hash[:8],
        )
    console.print(table)


@image_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="Image name.")]) -> None:
    """Remove an image and the cached artifacts no other image uses."""
    from warden.image.store import remove_image

    try:
        remove_image(Paths.from_env(), name)
    except WardenError as exc:
        raise _fail(exc) from None
    out().print(f"removed image {name}")
