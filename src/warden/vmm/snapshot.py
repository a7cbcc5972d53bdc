"""What the sealed saved states of VMs share: the machine a state belongs to, its
``meta.json`` read once, the ``x-ignore-shared`` switch and the wait for a migration.

Two kinds of saved state use them: templates (``vmm/templates.py``: device state plus a sealed
RAM file, cloned copy-on-write; the automatic boot template of each VM shape is one) and paused
VMs (``vmm/pause.py``: a full migration stream). Boot snapshots, the full-stream restore that
every ``create`` once used, are gone: a create clones the automatic template of its shape.

``machine_key`` is a hash of the QEMU version and of the argv with the per-VM names taken out,
so a state is only loaded into exactly the machine that made it (same image files, memory,
vCPUs, devices, kernel command line and accelerator).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from warden._errors import VMError
from warden.seal import SealRefused

STATE_FILE = "state.bin"
META_FILE = "meta.json"
MIGRATE_TIMEOUT_S = 120.0
META_MAX_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
    """The machine a saved state belongs to; its seal binds every field."""

    key: str
    qemu_version: str
    kernel_sha256: str
    initrd_sha256: str
    rootfs_sha256: str
    memory_mib: int
    vcpus: int

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def remove_boot_snapshots(home: Path) -> None:
    """Delete what an older warden's boot snapshots left (``snapshots/``, their secrets in
    ``keys/snapshot/``): nothing reads them any more, and each held ~70 MB."""
    for old in (home / "snapshots", home / "keys" / "snapshot"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def machine_key(argv: list[str], vm_id: str, rundir: Path, qemu_version: str) -> str:
    """The hash of ``qemu_version`` and QEMU's ``argv`` without the VM's own names."""
    normalized = [a.replace(str(rundir), "@RUN@").replace(vm_id, "@ID@") for a in argv]
    raw = json.dumps([qemu_version, normalized]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json``, read once (its seal is checked on these very bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SealRefused(f"its {META_FILE} is missing") from None
    except OSError as exc:  # a symlink (O_NOFOLLOW), a dir, ...: not what warden writes
        raise SealRefused(f"its {META_FILE} cannot be read ({exc.strerror})") from None
    try:
        raw = os.read(fd, META_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > META_MAX_BYTES:
        raise SealRefused(f"its {META_FILE} is larger than {META_MAX_BYTES} bytes")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise SealRefused(f"its {META_FILE} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise SealRefused(f"its {META_FILE} is not a JSON object")
    return meta


async def set_ignore_shared(qmp: QMPClient, on: bool) -> None:
    """Turn QEMU's ``x-ignore-shared`` migration capability on or off: on, a migration leaves
    out RAM that QEMU maps shared. Nothing turns it on any more (device state is saved with
    :func:`save_device_state`); a pause turns it off for a clone an earlier warden started."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": on}]},
    )


async def save_device_state(qmp: QMPClient, fd: int, what: str) -> None:
    """Write the stopped VM's device state, and no RAM at all, to ``fd`` (a file or memfd,
    written from offset 0), with QMP ``xen-save-devices-state``. Despite its name the command
    is generic (QEMU's ``qemu_save_device_state``: every non-RAM section, what a migration
    sends after RAM) and built into every QEMU. Unlike a migration with ``x-ignore-shared``,
    which QEMU 7.2 makes leave out only RAM mapped shared, it also leaves out a clone's
    private copy-on-write RAM, which the host copies itself (``memfd.copy_qemu_ram``). The
    stream has no configuration section, so every QEMU runs with
    ``migration.send-configuration=off`` (``vmm/argv.py``) and loads it like any other. QEMU
    opens the file as ``/dev/fdset/N`` (``add-fd``): a jailed QEMU needs no path to it."""
    writer = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)  # QEMU asks O_WRONLY
    try:
        qmp.send_fd_scm(writer)
        adding = qmp.execute("add-fd", {"opaque": "warden-device-state"})
        added = await asyncio.wait_for(adding, MIGRATE_TIMEOUT_S)
    except TimeoutError:
        raise VMError(f"{what}: QEMU did not answer add-fd in {MIGRATE_TIMEOUT_S:.0f} s") from None
    finally:
        os.close(writer)
    fdset = added["fdset-id"] if isinstance(added, dict) else None
    if not isinstance(fdset, int):
        raise VMError(f"{what} failed: QEMU's add-fd answered {added!r}")
    saving = qmp.execute(
        "xen-save-devices-state", {"filename": f"/dev/fdset/{fdset}", "live": False}
    )
    try:
        await asyncio.wait_for(saving, MIGRATE_TIMEOUT_S)
    except ExecuteError as exc:
        raise VMError(f"{what} failed: {exc}") from None
    except TimeoutError:
        raise VMError(f"{what} took over {MIGRATE_TIMEOUT_S:.0f} s") from None
    finally:
        # Best effort: QEMU closes the set's fd once its own copy is closed anyway.
        with contextlib.suppress(QMPError, TimeoutError):
            await asyncio.wait_for(qmp.execute("remove-fd", {"fdset-id": fdset}), 5.0)


async def wait_migration(
    qmp: QMPClient, what: str, check: Callable[[], None] | None = None
) -> None:
    """Wait until the migration QEMU runs completes; VMError naming ``what`` if it fails.
    ``check``, if given, runs before each poll and may raise to end the wait."""
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while True:
        if check is not None:
            check()
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc", status) if isinstance(info, dict) else status
            raise VMError(f"{what} failed: {desc}")
        if time.monotonic() > deadline:
            raise VMError(f"{what} took over {MIGRATE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)
