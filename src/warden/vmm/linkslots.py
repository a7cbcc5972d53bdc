"""Link slots: where a link's shared-memory region is plugged into a running VM.

microvm has no hotplug bus of its own, but with ``pcie=on`` it has a PCIe root complex, and
a ``pcie-root-port`` on it is a hotplug slot: QEMU can ``device_add`` an ``ivshmem-plain``
into it while the guest runs, and the guest kernel's ``pciehp`` (with ``pcie_ports=native``,
since microvm's ACPI grants it no native control) sees it arrive. So every VM boots with
:data:`LINK_SLOTS` empty root ports, which cost nothing until a link is made; a link plugs a
region into a free port of each of its two VMs (issue 10: measured against a VM created for
each link in docs/benchmarks.md).

A link's region (:class:`Region`) is a memfd that only the daemon and the two QEMUs hold: it
has no path, so nothing in any jail or on the host's filesystem can open it. The daemon
writes its header (:mod:`warden.wire.ring`) and passes it to each QEMU over QMP
(``add-fd``, SCM_RIGHTS); QEMU maps it shared (``memory-backend-file`` on
``/proc/self/fd/N``) as the ``ivshmem-plain`` BAR. The region only ever holds records sealed
by the guests.

When the link ends, :meth:`Region.revoke` zeroes it (a punched hole reads as zeros) and
truncates it to nothing: its pages leave both QEMUs' mappings at once, so a guest that keeps
writing there after the end reaches no other guest (its own QEMU faults and dies: only the
guest that broke the rules pays). Then each slot is unplugged (``device_del``; the agent
powers the slot off as soon as it let the region go, which completes the unplug) and the
backend deleted. A guest that never lets go keeps its slot busy until it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warden._errors import LinkError, StateTransitionError
from warden.wire.ring import REGION_SIZE, pack_header

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

log = logging.getLogger(__name__)

LINK_SLOTS = 4
"""Empty root ports every VM boots with: the most links one VM can have over shared memory."""
PORT_ID = "link-port{}"
DEVICE_ID = "link-dev{}"
BACKEND_ID = "link-mem{}"
QMP_TIMEOUT_S = 10.0
"""The deadline of each plug, and of each QMP step of an unplug (a wedged QEMU must not hold
the slots, or the link's creator, forever)."""
UNPLUG_TIMEOUT_S = 10.0
"""How long an unplug waits for the guest to release the device (pciehp's own delay is 5 s
when the agent does not power the slot off itself)."""
MEMFD_NAME = "warden-link"
KERNEL_ARGS = ("pcie_ports=native",)
"""The guest kernel's arguments for the slots: pciehp handles the root ports' hotplug."""


def machine_option(slots: int = LINK_SLOTS) -> str:
    """The ``-M microvm`` option that gives it a PCIe root complex (only with slots)."""
    return "pcie=on," if slots else ""


def slot_args(slots: int = LINK_SLOTS) -> list[str]:
    """QEMU's arguments: ``slots`` empty hotplug root ports on the root complex."""
    args: list[str] = []
    for i in range(slots):
        port = f"pcie-root-port,id={PORT_ID.format(i)},bus=pcie.0,chassis={i + 1},slot=0"
        args += ["-device", port]
    return args


class Region:
    """A link's shared memory: a memfd with the ring's header (:mod:`warden.wire.ring`)."""

    def __init__(self, link_id: bytes) -> None:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        self.fd = os.memfd_create(MEMFD_NAME, flags)
        try:
            os.ftruncate(self.fd, REGION_SIZE)
            os.pwrite(self.fd, pack_header(link_id), 0)
            # Nobody may grow it (a QEMU reopens it read-write); the daemon shrinks it when
            # the link ends, so it keeps F_SEAL_SHRINK off.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(self.fd)
            raise
        self.revoked = False

    def read(self, offset: int = 0, size: int = REGION_SIZE) -> bytes:
        """The region's bytes (tests and the benchmark read what the guests wrote)."""
        return os.pread(self.fd, size, offset)

    def revoke(self) -> None:
        """Zero the region and drop its pages from every mapping (truncate to nothing)."""
        if self.revoked:
            return
        self.revoked = True
        with contextlib.suppress(OSError):
            _punch_hole(self.fd, REGION_SIZE)
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self.fd >= 0:
            self.revoke()
            os.close(self.fd)
            self.fd = -1


def _punch_hole(fd: int, size: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros, its pages freed."""
    libc = ctypes.CDLL(None, use_errno=True)
    punch_hole, keep_size = 0x02, 0x01
    if libc.fallocate(fd, punch_hole | keep_size, ctypes.c_long(0), ctypes.c_long(size)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


@dataclass
class Slot:
    """One root port of a VM and the link in it (None: free)."""

    index: int
    link: str | None = None
    draining: bool = False
    """Unplugged by the host, not yet released by the guest."""


class Slots:
    """A running VM's link slots and the QMP steps that plug and unplug regions."""

    def __init__(self, count: int = LINK_SLOTS) -> None:
        self.slots = [Slot(i) for i in range(count)]
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    @property
    def busy(self) -> list[str]:
        """What occupies slots: link names, and ``(releasing)`` for a device being unplugged."""
        return [s.link or "(releasing)" for s in self.slots if s.link or s.draining]

    def check_none(self, vm: str, what: str) -> None:
        """StateTransitionError if a link's device is in a slot: a saved state (pause, fork,
        template) cannot hold another VM's shared memory."""
        if self.busy:
            raise StateTransitionError(
                f"VM {vm} has link devices in place ({', '.join(self.busy)}); remove its links "
                f"(`warden link rm NAME`) and {what} once they are released"
            )

    def reserve(self, link: str, vm: str) -> Slot:
        """A free slot for ``link``; LinkError naming the limit if there is none."""
        for slot in self.slots:
            if slot.link is None and not slot.draining:
                slot.link = link
                return slot
        if not self.slots:
            raise LinkError(f"sandbox {vm} has no link slots (it booted without them)")
        raise LinkError(
            f"sandbox {vm} has all {len(self.slots)} link slots in use "
            f"({', '.join(self.busy)}); remove one of its links first (`warden link rm NAME`)"
        )

    async def plug(self, qmp: QMPClient, slot: Slot, region: Region) -> None:
        """Plug ``region`` into ``slot``: on any failure, what was added is taken back."""
        async with self._lock, asyncio.timeout(QMP_TIMEOUT_S):
            await self._plug(qmp, slot.index, region)

    async def _plug(self, qmp: QMPClient, i: int, region: Region) -> None:
        """add-fd, the backend, the device; what was added is taken back on a failure."""
        qmp.send_fd_scm(region.fd)
        added = await qmp.execute("add-fd", {"opaque": f"warden-link-{i}"})
        fdset = _field(added, "fdset-id")
        try:
            backend = {
                "qom-type": "memory-backend-file",
                "id": BACKEND_ID.format(i),
                "mem-path": f"/proc/self/fd/{_field(added, 'fd')}",
                "size": REGION_SIZE,
                "share": True,
            }
            await qmp.execute("object-add", backend)
        finally:  # QEMU holds the file open through the backend: drop the passed copy
            with contextlib.suppress(Exception):
                await qmp.execute("remove-fd", {"fdset-id": fdset})
        try:
            await qmp.execute(
                "device_add",
                {
                    "driver": "ivshmem-plain",
                    "id": DEVICE_ID.format(i),
                    "memdev": BACKEND_ID.format(i),
                    "bus": PORT_ID.format(i),
                },
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await qmp.execute("object-del", {"id": BACKEND_ID.format(i)})
            raise

    async def unplug(self, qmp: QMPClient | None, slot: Slot) -> bool:
        """Take the region out of ``slot``: whether the guest released it (the slot is then
        free again; otherwise it stays busy, ``draining``, until the VM stops)."""
        slot.link, slot.draining = None, True
        if qmp is None:
            return False
        i = slot.index
        try:
            await asyncio.wait_for(
                qmp.execute("device_del", {"id": DEVICE_ID.format(i)}), QMP_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 (QMP's errors: the device is gone already)
            log.debug("link slot %d: device_del: %s", i, exc)
        if not await _wait_gone(qmp, DEVICE_ID.format(i), UNPLUG_TIMEOUT_S):
            log.warning("link slot %d: the guest did not release its device", i)
            return False
        try:
            await asyncio.wait_for(
                qmp.execute("object-del", {"id": BACKEND_ID.format(i)}), QMP_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("link slot %d: object-del: %s", i, exc)
            return False
        slot.draining = False
        return True

    async def adopt(self, qmp: QMPClient, qemu_pid: int) -> list[int]:
        """After a daemon restart: links died with the old daemon, but a region it plugged is
        still mapped by the QEMUs. Revoke every link region this QEMU holds (found among its
        open files, the memfds named ``warden-link``), and unplug the devices in the
        background; the slots stay busy until the guest released them. The slots found."""
        found = await _peripherals(qmp)
        busy = [s for s in self.slots if DEVICE_ID.format(s.index) in found]
        if not busy:
            return []
        revoke_held(qemu_pid)
        for slot in busy:
            slot.draining = True
            task = asyncio.create_task(self.unplug(qmp, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return [s.index for s in busy]


def revoke_held(pid: int) -> int:
    """Zero and truncate every link region process ``pid`` holds open; how many."""
    done = 0
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if not os.readlink(f"{fd_dir}/{name}").startswith(f"/memfd:{MEMFD_NAME} "):
                    continue
                fd = os.open(f"{fd_dir}/{name}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    with contextlib.suppress(OSError):
                        _punch_hole(fd, REGION_SIZE)
                    os.ftruncate(fd, 0)
                    done += 1
                finally:
                    os.close(fd)
    return done


def _field(reply: Any, key: str) -> int:
    if not isinstance(reply, dict) or not isinstance(reply.get(key), int):
        raise LinkError(f"QEMU's add-fd answered without {key!r}: {reply!r}")
    return int(reply[key])


async def _peripherals(qmp: QMPClient) -> set[str]:
    listed = await asyncio.wait_for(
        qmp.execute("qom-list", {"path": "/machine/peripheral"}), QMP_TIMEOUT_S
    )
    if not isinstance(listed, list):
        return set()
    return {str(p.get("name")) for p in listed if isinstance(p, dict)}


async def _wait_gone(qmp: QMPClient, device: str, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    while True:
        try:
            if device not in await _peripherals(qmp):
                return True
        except Exception:  # noqa: BLE001 (QEMU went away: nothing left to release)
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
