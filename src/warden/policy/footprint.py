"""The calibrated footprint of an idle VM: the PSS that admission charges (plus headroom) to a
VM it has not measured yet (``charge="measured"``, see ``policy/admission.py``).

Measured by booting a VM as ``warden run`` does (the default image, 256 MiB, 1 vCPU: a clone of
its boot template, or the cold boot that makes it), running ``true`` twice, waiting ``IDLE_S``
and reading its QEMU's PSS. Kept in ``$WARDEN_HOME/footprint.json`` (root's, 0600) for the same
image, QEMU and VM size. ``warden serve`` calibrates at start-up, before it listens, unless
``--vm-footprint`` gives one or one is saved; ``warden doctor`` prints it (and measures it if
none is saved). A ``Manager`` only loads a saved one: it never boots a VM by itself. Under TCG
here: about 175 MiB for a VM restored from a boot snapshot (before boot templates), against its
limit of 256 + 320 MiB.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from warden._errors import WardenError
from warden.config import Paths, private_dir, write_private

FILE_NAME = "footprint.json"
IMAGE = "default"
MEMORY_MIB = 256
IDLE_S = 1.0


@dataclass(frozen=True)
class Footprint:
    """One calibration: the PSS of an idle VM, and what it was measured with."""

    pss_mib: int
    memory_mib: int
    image: str
    rootfs_sha256: str
    qemu: str
    measured_at: float

    def matches(self, other: Footprint) -> bool:
        """Whether ``other`` was measured on the same image, QEMU and VM size."""
        key = ("memory_mib", "image", "rootfs_sha256", "qemu")
        return all(getattr(self, k) == getattr(other, k) for k in key)


def path(paths: Paths) -> Path:
    return paths.home / FILE_NAME


def load(paths: Paths) -> Footprint | None:
    """The saved calibration, if there is one that still matches this host's image and QEMU."""
    try:
        data = json.loads(path(paths).read_text())
        saved = Footprint(**data)
    except (OSError, ValueError, TypeError):
        return None
    try:
        current = _current(paths)
    except WardenError:
        return None
    return saved if saved.matches(current) and saved.pss_mib > 0 else None


def save(paths: Paths, footprint: Footprint) -> None:
    private_dir(paths.home)
    write_private(path(paths), (json.dumps(asdict(footprint), indent=2) + "\n").encode())


def _current(paths: Paths, pss_mib: int = 0) -> Footprint:
    """What a calibration now would be measured with (``pss_mib`` aside)."""
    from warden.image.store import load_image
    from warden.vmm.accel import qemu_version
    from warden.vmm.machine import QEMU_BINARY

    image = load_image(paths, IMAGE)
    return Footprint(
        pss_mib=pss_mib,
        memory_mib=MEMORY_MIB,
        image=IMAGE,
        rootfs_sha256=image.rootfs.sha256,
        qemu=qemu_version(QEMU_BINARY),
        measured_at=time.time(),
    )


async def measure(paths: Paths) -> Footprint:
    """Boot a VM in ``paths``' home, idle it and measure its PSS; save and return the
    calibration. Raises the boot's WardenError (no image, no QEMU...); leaves no VM behind."""
    from warden.policy.meter import pss_mib
    from warden.vmm.machine import Machine
    from warden.vmm.spec import VMSpec

    machine = Machine(VMSpec(image=IMAGE, memory_mib=MEMORY_MIB, vcpus=1), paths=paths)
    try:
        await machine.launch()
        for _ in range(2):
            await machine.agent.exec(["true"])
        await asyncio.sleep(IDLE_S)
        pss = pss_mib(machine.pid) if machine.pid is not None else None
    finally:
        await machine.shutdown()
    if pss is None:
        raise WardenError("could not read the calibration VM's PSS from /proc")
    footprint = await asyncio.to_thread(_current, paths, math.ceil(pss))
    await asyncio.to_thread(save, paths, footprint)
    return footprint
