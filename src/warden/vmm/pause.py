"""Pause and resume: a paused VM's memory and devices are saved to a sealed file, QEMU ends.

``pause``: the agent session is closed (the saved guest holds no host session), the VM is
stopped and its state streamed by a QMP migration into a pipe that the host copies to
``$WARDEN_HOME/paused/<id>/state.bin`` while hashing it and bounding its size (QEMU gets no
writable fd of the file). ``meta.json`` is then sealed with the host key, as a
template's is (``vmm/templates.py``), binding the VM id, the machine key of its QEMU argv
(image files, memory, vCPUs, devices, kernel command line, accelerator), QEMU's version, the
image digests and the file's size and SHA-256. QEMU then quits: the VM's RAM is freed. Its
runtime dir, uid, channel secret and guest filesystem (a tmpfs in guest RAM, so in the file)
stay.

``resume``: ``state.bin`` is opened once and checked on that open file (seal, configuration,
size, digest); the same fd is handed to QEMU (``-incoming fd:N``), started with the same argv
in the same runtime dir, under the same uid. A file that fails a check is refused
(:class:`PausedStateError`, HTTP 409) and kept for inspection; the VM stays paused. The guest
still holds the channel secret it had when it was paused: the first session authenticates
with it and hands the guest a fresh one (``channel_keys.begin_rekey``); its HELLO also sets
the guest's clock and reseeds its RNG (``guest/pid1.py:freshen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient, QMPError

from warden._errors import PausedStateError, StateTransitionError, VMError
from warden.config import Paths, open_private, private_dir, write_private
from warden.image.store import load_image, verify_image
from warden.seal import KeyStoreError, Sealer, SealRefused, sha256_fd
from warden.seal.keys import KEY_BYTES
from warden.vmm.accel import qemu_version, resolve_accel
from warden.vmm.argv import BootFiles
from warden.vmm.ownership import recorded_uid
from warden.vmm.snapshot import (
    META_FILE,
    MIGRATE_TIMEOUT_S,
    STATE_FILE,
    SnapshotConfig,
    machine_key,
    read_meta,
    set_ignore_shared,
    wait_migration,
)
from warden.vmm.state import VMState

if TYPE_CHECKING:
    from warden.vmm.machine import Machine

log = logging.getLogger(__name__)

SEAL_PURPOSE = "paused-vm/1"
"""Keeps a paused VM's record from passing for a template's, and the other way round."""
PIPE_CHUNK = 1 << 20
STREAM_MARGIN = 32 << 20
"""Beyond the guest's RAM, what a migration stream may add (page headers, device state): a
QEMU that sends more (one the guest took over) fails the pause instead of filling the disk."""
QUIT_TIMEOUT_S = 5.0


def paused_message(vm_id: str) -> str:
    return f"VM {vm_id} is paused; resume it first (`warden resume {vm_id}`, `Sandbox.resume(id)`)"


class PausedStates:
    """The sealed saved states of paused VMs, under ``$WARDEN_HOME/paused/<id>/``."""

    def __init__(self, paths: Paths) -> None:
        self.root = paths.paused
        self.sealer = Sealer(paths, SEAL_PURPOSE)

    def path(self, vm_id: str) -> Path:
        return self.root / vm_id / STATE_FILE

    def discard(self, vm_id: str) -> None:
        shutil.rmtree(self.root / vm_id, ignore_errors=True)

    async def save(self, qmp: QMPClient, vm_id: str, config: SnapshotConfig) -> int:
        """Stop the VM and stream its state into a sealed ``state.bin``; its size."""
        target = self.root / vm_id
        private_dir(self.root)
        private_dir(target)
        tmp = target / f".{STATE_FILE}.tmp"
        read_end, write_end = os.pipe()
        try:
            with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                copy = _Copier(read_end, f.fileno(), (config.memory_mib << 20) + STREAM_MARGIN)
                try:
                    await qmp.execute("stop")
                    # The whole RAM goes in the file: a clone started by an earlier warden
                    # had this on (its RAM came from its template); the resumed QEMU must
                    # get every page.
                    await set_ignore_shared(qmp, False)
                    qmp.send_fd_scm(write_end)
                    await qmp.execute("getfd", {"fdname": "warden-pause"})
                    os.close(write_end)  # QEMU has its own: its close ends the stream
                    write_end = -1
                    await qmp.execute("migrate", {"uri": "fd:warden-pause"})
                    await wait_migration(qmp, "saving the paused VM's state", copy.raise_failure)
                    size, digest = await copy.result()
                except BaseException:
                    await _abandon(qmp, copy, write_end)
                    write_end = -1
                    raise
                os.fsync(f.fileno())
            meta = {
                "vm_id": vm_id,
                **config.fields(),
                "state_size": size,
                "state_sha256": digest,
                "paused_at": time.time(),
            }
            write_private(target / META_FILE, json.dumps(self.sealer.seal(meta)).encode())
            tmp.replace(target / STATE_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(read_end)
        return size

    def open_verified(self, vm_id: str, config: SnapshotConfig) -> io.FileIO:
        """``state.bin`` of ``vm_id``, checked and open at offset 0 for QEMU to load.

        Raises PausedStateError if it is missing or fails a check (the file is kept)."""
        path = self.path(vm_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise PausedStateError(_refused(vm_id, f"{path} cannot be opened ({exc})")) from None
        try:
            self._verify(fd, vm_id, config)
        except (SealRefused, KeyStoreError, OSError) as exc:
            os.close(fd)
            raise PausedStateError(_refused(vm_id, str(exc))) from None
        os.lseek(fd, 0, os.SEEK_SET)
        return io.FileIO(fd, "rb", closefd=True)

    def _verify(self, fd: int, vm_id: str, config: SnapshotConfig) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealRefused(f"{STATE_FILE} is not a regular file")
        meta = self.sealer.verify(read_meta(self.root / vm_id / META_FILE))
        want: dict[str, Any] = {"vm_id": vm_id, **config.fields()}
        for name, value in want.items():
            if meta.get(name) != value:
                raise SealRefused(
                    f"it was sealed for another machine ({name} {meta.get(name)!r}, this VM "
                    f"{value!r}){_CHANGED.get(name.split('_')[0], '')}"
                )
        if meta.get("state_size") != st.st_size:
            raise SealRefused(
                f"{STATE_FILE} has {st.st_size} bytes, its seal says {meta.get('state_size')}: "
                "the file was changed after it was sealed"
            )
        if sha256_fd(fd) != meta.get("state_sha256"):
            raise SealRefused(
                f"the SHA-256 of {STATE_FILE} is not the sealed one: the file was changed "
                "after it was sealed"
            )


async def _abandon(qmp: QMPClient, copy: _Copier, write_end: int) -> None:
    """A save failed: end the stream (our end, and QEMU's if it still holds it) and let the
    copier finish before its file is closed."""
    if write_end >= 0:
        os.close(write_end)
    with contextlib.suppress(Exception):
        await qmp.execute("migrate_cancel")
    with contextlib.suppress(Exception):
        await qmp.execute("closefd", {"fdname": "warden-pause"})
    with contextlib.suppress(Exception):
        await asyncio.wait_for(copy.result(), QUIT_TIMEOUT_S)


_CHANGED = {
    "key": ": the QEMU command line this warden builds for it, or QEMU's version, is not the "
    "one it was paused with (a newer warden or QEMU); only what paused it can resume it",
    "qemu": ": QEMU was upgraded since it was paused",
    "kernel": ": its image was rebuilt since it was paused",
    "initrd": ": its image was rebuilt since it was paused",
    "rootfs": ": its image was rebuilt since it was paused",
}
"""Why a sealed field may differ other than by tampering (by its name's first word)."""


def _refused(vm_id: str, reason: str) -> str:
    return (
        f"the saved state of paused VM {vm_id} was refused: {reason}. It is not loaded; the "
        f"VM stays paused: remove it with `warden rm -f {vm_id}`"
    )


class _Copier:
    """Copies the migration stream from a pipe into the file, hashing it, in a thread; at most
    ``limit`` bytes (OSError beyond)."""

    def __init__(self, read_fd: int, out_fd: int, limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[tuple[int, str]] = self._loop.create_future()
        self._read_fd, self._out_fd, self._limit = read_fd, out_fd, limit
        threading.Thread(target=self._run, name="warden-pause-copy", daemon=True).start()

    def _run(self) -> None:
        h, size = hashlib.sha256(), 0
        try:
            while chunk := os.read(self._read_fd, PIPE_CHUNK):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._out_fd, view) :]
                size += len(chunk)
                if size > self._limit:
                    raise OSError(f"QEMU's migration stream passed {self._limit} bytes")
        except OSError as exc:
            self._loop.call_soon_threadsafe(_settle, self._done, exc)
            return
        self._loop.call_soon_threadsafe(_settle, self._done, (size, h.hexdigest()))

    def raise_failure(self) -> None:
        """Raise the copy's error if it failed (a stream too long, a full disk)."""
        if self._done.done() and self._done.exception() is not None:
            raise VMError(f"saving the paused VM's state failed: {self._done.exception()}")

    async def result(self) -> tuple[int, str]:
        return await asyncio.wait_for(asyncio.shield(self._done), MIGRATE_TIMEOUT_S)


def _settle(future: asyncio.Future[tuple[int, str]], value: tuple[int, str] | OSError) -> None:
    if future.done():
        return
    if isinstance(value, OSError):
        future.set_exception(value)
    else:
        future.set_result(value)


def _config(machine: Machine, qemu_argv: list[str]) -> SnapshotConfig:
    assert machine.image is not None
    version = qemu_version(machine.qemu, machine.paths.cache)
    return SnapshotConfig(
        key=machine_key(qemu_argv, machine.id, machine.run.dir, version),
        qemu_version=version,
        kernel_sha256=machine.image.kernel.sha256,
        initrd_sha256=machine.image.initrd.sha256,
        rootfs_sha256=machine.image.rootfs.sha256,
        memory_mib=machine.spec.memory_mib,
        vcpus=machine.spec.vcpus,
    )


# -- pause ---------------------------------------------------------------------------------


async def pause(machine: Machine) -> None:
    """Save a running VM to its sealed file and end its QEMU; the VM is then ``paused``.

    StateTransitionError if it is not running or has requests in flight; on any other
    failure the VM runs on (a new agent session) and the error is raised."""
    if machine.state is not VMState.RUNNING:
        raise StateTransitionError(
            f"VM {machine.id} is {machine.state.value}; only a running VM can be paused"
        )
    machine.link_slots.check_none(machine.id, "pause it")
    busy = f"VM {machine.id} is being paused; resume it once it is paused"
    async with machine.idle.exclusive(busy):
        await _save_and_end(machine)
    machine.idle.frozen = paused_message(machine.id)


async def _save_and_end(machine: Machine) -> None:
    qmp = machine._qmp
    assert qmp is not None and machine.image is not None
    config = _config(machine, _resume_argv(machine))
    states = PausedStates(machine.paths)
    await _stop_watching(machine)
    if machine._agent is not None:
        await machine._agent.close()  # the saved guest must hold no host session
        machine._agent = None
    machine.idle.unbind()
    started = time.perf_counter()
    try:
        size = await states.save(qmp, machine.id, config)
    except BaseException as exc:
        await _run_on(machine, qmp)
        if isinstance(exc, (QMPError, OSError)):
            raise VMError(f"pausing VM {machine.id} failed: {exc}; it runs on") from exc
        raise
    machine._set_state(VMState.PAUSED)
    log.info(
        "VM %s paused: %d MiB saved in %.2f s",
        machine.id,
        size >> 20,
        time.perf_counter() - started,
    )
    await _end_qemu(machine, qmp)


def _resume_argv(machine: Machine) -> list[str]:
    """The bare argv a resume will start QEMU with (for a clone too: its RAM comes back from
    the saved state, not from its template), without changing the running VM's."""
    assert machine.image is not None
    image = machine.image
    saved = machine.argv, machine._qemu_argv
    try:
        return machine._set_argv(BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path))
    finally:
        machine.argv, machine._qemu_argv = saved


async def _stop_watching(machine: Machine) -> None:
    watch, machine._watch = machine._watch, None
    if watch is not None and watch is not asyncio.current_task():
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch


async def _run_on(machine: Machine, qmp: QMPClient) -> None:
    """A pause failed: continue the VM and give it a new session."""
    with contextlib.suppress(Exception):
        await qmp.execute("cont")
    machine._watch = asyncio.create_task(machine._watch_exit(), name=f"warden-vm-{machine.id}")
    machine._agent = await machine._open_agent(machine.spec.agent_timeout_s, resync=True)
    machine._bind_idle()


async def _end_qemu(machine: Machine, qmp: QMPClient) -> None:
    """QEMU quits (its RAM freed); the runtime dir, uid and keys stay."""
    proc = machine._proc
    with contextlib.suppress(Exception):
        await asyncio.wait_for(qmp.execute("quit"), QUIT_TIMEOUT_S)
    if proc is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), QUIT_TIMEOUT_S)
    await machine._stop_process()  # SIGKILL if it is still there; drops QMP and the console
    machine._proc = None
    if machine.cgroup is not None:
        await asyncio.to_thread(machine.cgroup.remove)
        machine.cgroup = None


# -- resume --------------------------------------------------------------------------------


async def resume(machine: Machine) -> None:
    """Start a paused VM's QEMU from its verified saved state; the VM then runs again.

    StateTransitionError if it is not paused; PausedStateError if its saved state is refused;
    LaunchError/AgentTimeoutError if QEMU or the agent fails (the VM stays paused)."""
    if machine.state is not VMState.PAUSED:
        raise StateTransitionError(
            f"VM {machine.id} is {machine.state.value}; only a paused VM can be resumed"
        )
    if machine.image is None:  # rebuilt from the store by a new manager
        await asyncio.to_thread(_prepare_again, machine)
    assert machine.image is not None
    boot = BootFiles(
        machine.image.kernel.path, machine.image.initrd.path, machine.image.rootfs.path
    )
    argv = machine._set_argv(boot)
    states = PausedStates(machine.paths)
    config = _config(machine, argv)
    state = await asyncio.to_thread(states.open_verified, machine.id, config)
    held = await asyncio.to_thread(_held_secret, machine)
    machine._make_cgroups()
    machine._secret = os.urandom(KEY_BYTES) if held is not None else None
    try:
        await machine._spawn(restore=state)
        await machine._connect(restored=True, held=held)
    except BaseException:
        await _back_to_paused(machine, held)
        raise
    machine._set_state(VMState.RUNNING)
    machine._watch = asyncio.create_task(machine._watch_exit(), name=f"warden-vm-{machine.id}")
    machine.idle.reopen()
    machine._bind_idle()
    await asyncio.to_thread(states.discard, machine.id)


def _held_secret(machine: Machine) -> bytes | None:
    """The channel secret inside the saved guest (its current one when it was paused), and
    the 0600 file QEMU hands through fw_cfg again (removed once the agent answered)."""
    if machine.plaintext_channel:
        return None
    held = machine._secret or machine.channel_keys.current(machine.id)
    if held is None:
        raise VMError(
            f"no channel secret is kept for paused VM {machine.id} (its key file was removed); "
            f"it cannot be resumed: remove it with `warden rm -f {machine.id}`"
        )
    machine.run.channel_key.unlink(missing_ok=True)
    fd = open_private(machine.run.channel_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as f:
        f.write(held)
    if machine.run.channel_key not in machine.qemu_reads:
        machine.qemu_reads.append(machine.run.channel_key)
    return held


async def _back_to_paused(machine: Machine, held: bytes | None) -> None:
    """A resume failed: end the new QEMU; the saved state (what the guest holds) stays."""
    await machine._stop_process()
    machine._proc = None
    machine.run.channel_key.unlink(missing_ok=True)
    machine._secret = held
    if held is not None:  # the saved guest holds ``held``, whatever the failed session did
        await asyncio.to_thread(machine.channel_keys.begin_rekey, machine.id, held, held)
        await asyncio.to_thread(machine.channel_keys.end_rekey, machine.id)
    if machine.cgroup is not None:
        await asyncio.to_thread(machine.cgroup.remove)
        machine.cgroup = None


def _prepare_again(machine: Machine) -> None:
    """What a launch resolved, for a machine rebuilt from the store: its image (verified),
    accelerator, jail and uid. The runtime dir is the one it was paused with."""
    if not machine.run.dir.is_dir():
        raise PausedStateError(
            f"paused VM {machine.id} has lost its runtime dir {machine.run.dir}; it cannot be "
            f"resumed: remove it with `warden rm -f {machine.id}`"
        )
    machine.image = load_image(machine.paths, machine.spec.image)
    verify_image(machine.image)
    image = machine.image
    boot = BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path)
    machine.accel = resolve_accel(
        machine.spec.accel, machine.paths, boot, image.kernel.sha256, machine.qemu
    )
    machine.jail = machine._plan_jail(boot)
    machine.uid = recorded_uid(machine.run.dir)
    if machine.jail is not None and machine.jail.uid and machine.uid is None:
        raise PausedStateError(
            f"paused VM {machine.id} has no recorded uid; it cannot be resumed: remove it "
            f"with `warden rm -f {machine.id}`"
        )


def rebuilt(machine: Machine) -> Machine:
    """Mark a machine just made for a paused VM of the store as paused (no QEMU runs)."""
    machine.state = VMState.PAUSED  # its record says so; no transition happens here
    machine.idle.frozen = paused_message(machine.id)
    return machine


def is_paused_on_disk(paths: Paths, vm_id: str) -> bool:
    return PausedStates(paths).path(vm_id).is_file()
