"""``warden doctor``: check what warden needs on this host and say how to fix each problem."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Table

from warden._errors import WardenError
from warden.config import Paths


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _checks() -> list[Check]:
    from warden.image.store import load_image, verify_image
    from warden.vmm.accel import kvm_usable_device, qemu_version, resolve_accel
    from warden.vmm.argv import BootFiles
    from warden.vmm.machine import QEMU_BINARY

    paths = Paths.from_env()
    checks: list[Check] = []
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        checks.append(
            Check("qemu", False, f"{QEMU_BINARY} not found", "apt-get install qemu-system-x86")
        )
    else:
        checks.append(Check("qemu", True, f"{qemu_version(qemu)} ({qemu})"))
    for tool, pkg in (
        ("setpriv", "util-linux"),
        ("mmdebstrap", "mmdebstrap"),
        ("mksquashfs", "squashfs-tools"),
        ("busybox", "busybox-static"),
        ("depmod", "kmod"),
    ):
        found = shutil.which(tool)
        checks.append(
            Check(tool, found is not None, found or "not found", f"apt-get install {pkg}")
        )
    home_ok = os.access(paths.home if paths.home.exists() else paths.home.parent, os.W_OK)
    checks.append(
        Check(
            "data dir",
            home_ok,
            str(paths.home),
            "run as root, or set WARDEN_HOME to a writable directory",
        )
    )
    try:
        image = load_image(paths, "default")
        verify_image(image)
        checks.append(
            Check(
                "kernel",
                True,
                f"{image.kernel_version} ({image.kernel.size // 1024} KiB, sha256 ok)",
            )
        )
        checks.append(Check("image", True, f"default: rootfs {image.rootfs.size // (1 << 20)} MiB"))
    except WardenError as exc:
        checks.append(Check("image", False, str(exc), "warden image build default"))
        image = None
    kvm_why_not = kvm_usable_device()
    checks.append(Check("/dev/kvm", kvm_why_not is None, kvm_why_not or "opens read-write"))
    if qemu is not None and image is not None:
        boot = BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path)
        try:
            choice = resolve_accel("auto", paths, boot, image.kernel.sha256, qemu)
            checks.append(Check("accelerator", True, f"{choice.name}: {choice.reason}"))
        except WardenError as exc:
            checks.append(Check("accelerator", False, str(exc)))
    else:
        checks.append(
            Check("accelerator", False, "unknown until QEMU and the image are present", "")
        )
    return checks


def doctor() -> None:
    console = Console()
    checks = _checks()
    table = Table(title="warden doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    table.add_column("fix")
    for c in checks:
        table.add_row(
            c.name,
            "[green]ok[/green]" if c.ok else "[red]problem[/red]",
            c.detail,
            "" if c.ok else c.fix,
        )
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
