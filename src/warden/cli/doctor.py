"""``warden doctor``: check what warden needs on this host and say how to fix each problem."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from warden._errors import WardenError
from warden.config import Paths

if TYPE_CHECKING:
    from warden.image.store import Image


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    downgrade: bool = False
    """Not ok, but warden runs anyway, with less (a jail feature): logged for every VM."""


TOOLS = (
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("mmdebstrap", "mmdebstrap"),
    ("mksquashfs", "squashfs-tools"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
)
"""Host tools besides QEMU, and the Debian package of each."""


def _qemu_check() -> tuple[str | None, Check]:
    """The QEMU binary (None if missing) and its check."""
    from warden.vmm.accel import qemu_version
    from warden.vmm.machine import QEMU_BINARY

    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        return None, Check(
            "qemu", False, f"{QEMU_BINARY} not found", "apt-get install qemu-system-x86"
        )
    return qemu, Check("qemu", True, f"{qemu_version(qemu)} ({qemu})")


def _tool_checks() -> list[Check]:
    checks = []
    for tool, pkg in TOOLS:
        found = shutil.which(tool)
        checks.append(
            Check(tool, found is not None, found or "not found", f"apt-get install {pkg}")
        )
    return checks


def _home_check(paths: Paths) -> Check:
    home_ok = os.access(paths.home if paths.home.exists() else paths.home.parent, os.W_OK)
    return Check(
        "data dir",
        home_ok,
        str(paths.home),
        "run as root, or set WARDEN_HOME to a writable directory",
    )


def _fd_check() -> Check:
    """Whether the daemon can hold the open files of many VMs (it raises its soft limit to
    the hard one: ``server/run.py:raise_fd_limit``)."""
    import resource

    from warden.server.run import vm_room

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return Check("open files", True, "no hard limit")
    vms = vm_room(hard)
    return Check(
        "open files",
        vms >= 256,
        f"hard limit {hard}: room for about {vms} VMs in the daemon",
        "raise the hard limit on open files (LimitNOFILE= in the daemon's unit, ulimit -Hn)",
    )


def _image_checks(paths: Paths) -> tuple[Image | None, list[Check]]:
    """The default image (None if it is missing or damaged) and its checks."""
    from warden.image.store import load_image, verify_image

    try:
        image = load_image(paths, "default")
        verify_image(image)
    except WardenError as exc:
        return None, [Check("image", False, str(exc), "warden image build default")]
    return image, [
        Check(
            "kernel",
            True,
            f"{image.kernel_version} ({image.kernel.size // 1024} KiB, sha256 ok)",
        ),
        Check("image", True, f"default: rootfs {image.rootfs.size // (1 << 20)} MiB"),
    ]


def _accel_check(paths: Paths, qemu: str | None, image: Image | None) -> Check:
    """Which accelerator a VM would get (a probe boot, cached)."""
    from warden.vmm.accel import resolve_accel
    from warden.vmm.argv import BootFiles

    if qemu is None or image is None:
        return Check("accelerator", False, "unknown until QEMU and the image are present", "")
    boot = BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path)
    try:
        choice = resolve_accel("auto", paths, boot, image.kernel.sha256, qemu)
    except WardenError as exc:
        return Check("accelerator", False, str(exc))
    return Check("accelerator", True, f"{choice.name}: {choice.reason}")


JAIL_FIXES = {
    "uid range": "run warden as root, and give no user or group an id in 400000-465535",
    "idmapped mounts": "Linux >= 5.12, with $WARDEN_HOME on ext4, xfs, btrfs or tmpfs",
    "mount ns": "a kernel with namespaces; a container must allow unshare(2) and mounts",
    "pid ns": "a kernel with PID namespaces; a container must allow unshare(2)",
    "net ns": "a kernel with network namespaces; a container must allow unshare(2)",
    "seccomp sandbox": "a kernel with seccomp filters and QEMU built with seccomp (Debian's is)",
    "no_new_privs": "Linux >= 3.5",
    "cgroups": "mount the cgroup v1 memory, cpu and pids controllers under /sys/fs/cgroup",
}


def _jail_checks(paths: Paths, qemu: str | None, image: Image | None) -> list[Check]:
    """Each jail feature: there, or a downgrade (every VM runs without it, and says so)."""
    from warden.jail import features

    if qemu is None or image is None:
        return [Check("jail", False, "unknown until QEMU and the image are present")]
    try:
        host = features.detect(paths, qemu, image.kernel.path, fresh=True)
    except (OSError, WardenError) as exc:
        return [Check("jail", False, f"the jail's probe failed: {exc}")]
    return [
        Check(f"jail: {name}", ok, detail, JAIL_FIXES.get(name, ""), downgrade=not ok)
        for name, ok, detail in host.rows()
    ]


def _footprint_check(paths: Paths, qemu: str | None, image: Image | None) -> Check:
    """The PSS of an idle VM that the daemon's admission charges a VM not measured yet: the
    saved calibration, else measured now (a VM boots) and saved for the daemon."""
    import asyncio

    from warden.policy import footprint

    name = "admission footprint"
    if qemu is None or image is None:
        return Check(name, False, "unknown until QEMU and the image are present")
    saved = footprint.load(paths)
    how = "calibrated"
    if saved is None:
        try:
            saved = asyncio.run(footprint.measure(paths))
        except WardenError as exc:
            return Check(
                name, False, f"could not boot a VM to measure it: {exc}", "fix the checks above"
            )
        how = "measured now"
    return Check(
        name,
        True,
        f"an idle {saved.memory_mib} MiB VM: PSS {saved.pss_mib} MiB ({how}; charged + "
        "headroom to each VM until it is measured)",
    )


def _checks() -> list[Check]:
    from warden.vmm.accel import kvm_flavour, kvm_usable_device

    paths = Paths.from_env()
    qemu, qemu_check = _qemu_check()
    checks = [qemu_check, *_tool_checks(), _home_check(paths), _fd_check()]
    image, image_checks = _image_checks(paths)
    checks += image_checks
    kvm_why_not = kvm_usable_device()
    opens = "opens read-write" + (f"; {flavour}" if (flavour := kvm_flavour()) else "")
    checks.append(Check("/dev/kvm", kvm_why_not is None, kvm_why_not or opens))
    checks.append(_accel_check(paths, qemu, image))
    checks += _jail_checks(paths, qemu, image)
    checks.append(_footprint_check(paths, qemu, image))
    return checks


def _status(check: Check) -> str:
    if check.ok:
        return "[green]ok[/green]"
    return "[yellow]downgrade[/yellow]" if check.downgrade else "[red]problem[/red]"


def doctor() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    checks = _checks()
    table = Table(title="warden doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    table.add_column("fix")
    for c in checks:
        table.add_row(c.name, _status(c), c.detail, "" if c.ok else c.fix)
    console.print(table)
    downgrades = [c.name.removeprefix("jail: ") for c in checks if c.downgrade]
    if downgrades:
        console.print(
            f"[yellow]VMs run in a partial jail, without {', '.join(downgrades)}[/yellow] "
            "(each launch logs it; --require-jail refuses to launch instead)"
        )
    if not all(c.ok or c.downgrade for c in checks):
        raise typer.Exit(1)
