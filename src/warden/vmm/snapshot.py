"""Boot snapshots: boot a configuration once, restore it from then on.

Under TCG a cold boot spends about 1.5 s in the kernel and another 1.5 s translating Python's
start-up code for the agent. A VM restored from a snapshot taken right after its agent
first answered skips both: QEMU loads the saved state (``-incoming fd:N``) and the guest goes
on from there.

* The key is a hash of the QEMU version and of the argv with the per-VM names taken out, so a
  snapshot is only restored into exactly the machine that made it (same image files, memory,
  vCPUs, devices, kernel command line and accelerator).
* The snapshot is taken before any user request reaches the VM, with the agent connection
  closed, so it holds a just-booted guest and nothing of any user.
* Every restored VM gets a fresh RNG seed and the time in the agent HELLO, before it runs
  anything (see ``guest/pid1.py:freshen``).
* Files are written to a temp name and renamed, so a crash never leaves half a snapshot; a
  snapshot that fails to restore is deleted and the VM boots cold.

**Sealed.** A snapshot is what QEMU loads into a VM, so it is authenticated before QEMU reads a
byte of it (``seal/``): ``meta.json`` holds the configuration it was made for (the snapshot key,
QEMU's version, the sha256 of kernel, initrd and rootfs, memory, vCPUs), the size and SHA-256
of ``state.bin``, and a seal, HMAC-SHA256 with the host key ``keys/seal.key`` over all of that.
A restore opens ``state.bin`` once, checks the seal, the configuration and the file's digest on
that open file, rewinds it and hands the same fd to QEMU (``-incoming fd:N``): nothing is
checked by path and then loaded by path. A snapshot that fails any check is logged with the
reason, deleted, and the VM boots cold (and saves a fresh sealed snapshot).

Hashing ``state.bin`` (70 MB) costs about 50 ms, so its digest is remembered by its stat like
the image files' (``seal/digests.py`` argues why that is sound): an unchanged file is hashed
once, and every later restore only checks the seal of ``meta.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from warden._errors import VMError
from warden.config import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    Paths,
    open_private,
    private_dir,
    write_private,
)
from warden.seal import DigestRecord, KeyStoreError, Sealer, SealRefused, sha256_fd
from warden.vmm.channel_keys import ChannelKeys

log = logging.getLogger(__name__)

STATE_FILE = "state.bin"
META_FILE = "meta.json"
MIGRATE_TIMEOUT_S = 120.0
META_MAX_BYTES = 1 << 16
SEAL_PURPOSE = "boot-snapshot/1"
"""Keeps a sealed boot snapshot's record from passing for another kind of sealed record."""


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
    """The machine a snapshot belongs to; its seal binds every field."""

    key: str
    qemu_version: str
    kernel_sha256: str
    initrd_sha256: str
    rootfs_sha256: str
    memory_mib: int
    vcpus: int

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BootSnapshots:
    """The snapshot store under ``$WARDEN_HOME/snapshots/<key>/``."""

    def __init__(self, paths: Paths) -> None:
        self.root = paths.home / "snapshots"
        self.sealer = Sealer(paths, SEAL_PURPOSE)
        self.digests = DigestRecord(paths.cache)
        self.keys = ChannelKeys(paths)
        """The channel secret inside each snapshot's guest memory (``snapshot/<key>``)."""

    @staticmethod
    def key(argv: list[str], vm_id: str, rundir: Path, qemu_version: str) -> str:
        normalized = [a.replace(str(rundir), "@RUN@").replace(vm_id, "@ID@") for a in argv]
        raw = json.dumps([qemu_version, normalized]).encode()
        return hashlib.sha256(raw).hexdigest()[:24]

    def lookup(self, key: str) -> Path | None:
        state = self.root / key / STATE_FILE
        if not state.is_file():
            return None
        _tighten(state.parent)  # one saved by an older warden was readable by all
        return state

    def open_sealed(self, config: SnapshotConfig) -> io.FileIO | None:
        """The snapshot of ``config``, verified and open at offset 0, for QEMU to load.

        None if there is none, or if it fails a check: then it is deleted and the reason
        logged, and the caller boots cold. The caller passes the file's fd to QEMU and closes it.
        """
        path = self.root / config.key / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._refuse(path, f"{STATE_FILE} cannot be opened ({exc.strerror})")
            self.discard(config.key)
            return None
        try:
            self._verify(fd, path, config)
        except SealRefused as exc:
            self._refuse(path, str(exc))
            self._discard_if_same(config.key, fd)
            os.close(fd)
            return None
        except (OSError, KeyStoreError) as exc:
            log.warning("boot snapshot %s cannot be verified (%s); booting cold", path, exc)
            os.close(fd)
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        return io.FileIO(fd, "rb", closefd=True)

    @staticmethod
    def _refuse(path: Path, reason: str) -> None:
        log.warning(
            "boot snapshot %s refused: %s; deleting it, booting cold and sealing a new one",
            path.parent,
            reason,
        )

    def _verify(self, fd: int, path: Path, config: SnapshotConfig) -> None:
        """Raise SealRefused unless ``meta.json`` is sealed by the host key for ``config`` and
        the file open at ``fd`` is the one it was sealed with."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealRefused(f"{STATE_FILE} is not a regular file")
        if st.st_mode & 0o077:  # one saved by an older warden was readable by all
            os.fchmod(fd, PRIVATE_FILE)
        meta = self.sealer.verify(read_meta(path.parent / META_FILE))
        want = config.fields()
        for name, value in want.items():
            if meta.get(name) != value:
                raise SealRefused(
                    f"it was sealed for another configuration ({name} {meta.get(name)!r}, "
                    f"this VM {value!r})"
                )
        if meta.get("state_size") != st.st_size:
            raise SealRefused(
                f"{STATE_FILE} has {st.st_size} bytes, its seal says {meta.get('state_size')}: "
                "the file was changed after it was sealed"
            )
        if self.digests.digest(path, fd) != meta.get("state_sha256"):
            raise SealRefused(
                f"the SHA-256 of {STATE_FILE} is not the sealed one: the file was changed "
                "after it was sealed"
            )

    def _discard_if_same(self, key: str, fd: int) -> None:
        """Delete the snapshot of ``key`` if its ``state.bin`` is still the file open at ``fd``
        (not a fresh one that another process saved meanwhile)."""
        st = os.fstat(fd)
        try:
            now = os.stat(self.root / key / STATE_FILE, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            self.discard(key)

    def channel_secret(self, key: str) -> bytes | None:
        """The channel secret that the guest of snapshot ``key`` holds (None: none kept, so
        the snapshot cannot be used)."""
        try:
            return self.keys.snapshot(key)
        except KeyStoreError as exc:
            log.warning("the channel secret of boot snapshot %s is unusable: %s", key, exc)
            return None

    def discard(self, key: str) -> None:
        self.keys.forget_snapshot(key)
        target = self.root / key
        for child in (target / STATE_FILE, target / META_FILE):
            if child.is_dir() and not child.is_symlink():  # not ours: planted
                shutil.rmtree(child, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                child.unlink()
        with contextlib.suppress(OSError):
            target.rmdir()

    def prune(self) -> list[Path]:
        """Delete snapshots whose image files are gone (the image was rebuilt or removed)."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            _tighten(entry)  # what an older warden left readable by all
            if not entry.is_dir():
                continue
            try:
                files = json.loads((entry / META_FILE).read_text()).get("boot_files", [])
            except (OSError, ValueError, AttributeError):
                continue  # being written right now, or not ours to judge
            if any(not Path(f).exists() for f in files):
                self.keys.forget_snapshot(entry.name)
                shutil.rmtree(entry, ignore_errors=True)
                (self.root / f".{entry.name}.lock").unlink(missing_ok=True)
                removed.append(entry)
        return removed

    @contextlib.contextmanager
    def writer_lock(self, key: str) -> Iterator[bool]:
        """Yield True if this process may write ``key`` (no one else is writing it)."""
        private_dir(self.root)
        lock_fd = open_private(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT)
        with os.fdopen(lock_fd, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sealed_meta(
        self, config: SnapshotConfig, extra: dict[str, Any], size: int, digest: str
    ) -> bytes:
        """The sealed ``meta.json`` of a ``state.bin`` of ``size`` bytes and SHA-256 ``digest``."""
        meta = {
            **extra,
            **config.fields(),
            "state_size": size,
            "state_sha256": digest,
            "created": time.time(),
        }
        return json.dumps(self.sealer.seal(meta), sort_keys=True, indent=1).encode()

    async def capture(self, qmp: QMPClient, config: SnapshotConfig, extra: dict[str, Any]) -> Path:
        """Pause the VM, save its state as the sealed snapshot of ``config``. The caller
        resumes it (``cont``). ``extra`` goes into ``meta.json`` too (sealed as well).

        Call with :meth:`writer_lock` held for ``config.key``.
        """
        target = self.root / config.key
        private_dir(target)
        for stale in target.glob(f".{STATE_FILE}.*.tmp"):  # a writer that died; we hold the lock
            stale.unlink(missing_ok=True)
        tmp = target / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            await qmp.execute("stop")
            with os.fdopen(open_private(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC), "r+b") as f:
                qmp.send_fd_scm(f.fileno())
                await qmp.execute("getfd", {"fdname": "warden-snapshot"})
                await qmp.execute("migrate", {"uri": "fd:warden-snapshot"})
                await wait_migration(qmp, "saving the boot snapshot")
                f.flush()
                os.fsync(f.fileno())
                # Hashed from the fd QEMU wrote: what is sealed is what was saved.
                size = os.fstat(f.fileno()).st_size
                digest = await asyncio.to_thread(sha256_fd, f.fileno())
            write_private(target / META_FILE, self.sealed_meta(config, extra, size, digest))
            tmp.replace(target / STATE_FILE)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return target / STATE_FILE


def _tighten(path: Path) -> None:
    """Make ``path`` root-only (a dir 0700 and its files 0600), changing only loose modes:
    a chmod sets the file's ctime, which would make its remembered digest stale."""
    with contextlib.suppress(OSError):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
                os.chmod(path, PRIVATE_DIR)
            for child in path.iterdir():
                if child.is_file() and not child.is_symlink():
                    _tighten(child)
        elif stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != PRIVATE_FILE:
            os.chmod(path, PRIVATE_FILE)


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
    out RAM that QEMU maps shared (a template's or a fork's device state only)."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": on}]},
    )


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
