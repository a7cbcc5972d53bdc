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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from qemu.qmp import QMPClient

from warden._errors import VMError
from warden.config import (
    PRIVATE_FILE,
    Paths,
    open_private,
    private_dir,
    restrict,
    write_private,
)

STATE_FILE = "state.bin"
META_FILE = "meta.json"
MIGRATE_TIMEOUT_S = 120.0


class BootSnapshots:
    """The snapshot store under ``$WARDEN_HOME/snapshots/<key>/``."""

    def __init__(self, paths: Paths) -> None:
        self.root = paths.home / "snapshots"

    @staticmethod
    def key(argv: list[str], vm_id: str, rundir: Path, qemu_version: str) -> str:
        normalized = [a.replace(str(rundir), "@RUN@").replace(vm_id, "@ID@") for a in argv]
        raw = json.dumps([qemu_version, normalized]).encode()
        return hashlib.sha256(raw).hexdigest()[:24]

    def lookup(self, key: str) -> Path | None:
        state = self.root / key / STATE_FILE
        if not state.is_file():
            return None
        with contextlib.suppress(OSError):  # one saved by an older warden was readable by all
            restrict(state.parent)
        return state

    def discard(self, key: str) -> None:
        target = self.root / key
        for child in (target / STATE_FILE, target / META_FILE):
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
        with contextlib.suppress(OSError):
            target.rmdir()

    def prune(self) -> list[Path]:
        """Delete snapshots whose image files are gone (the image was rebuilt or removed)."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            with contextlib.suppress(OSError):  # what an older warden left readable by all
                if entry.is_dir():
                    restrict(entry)
                else:
                    os.chmod(entry, PRIVATE_FILE)
            if not entry.is_dir():
                continue
            try:
                files = json.loads((entry / META_FILE).read_text()).get("boot_files", [])
            except (OSError, ValueError, AttributeError):
                continue  # being written right now, or not ours to judge
            if any(not Path(f).exists() for f in files):
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

    async def capture(self, qmp: QMPClient, key: str, meta: dict[str, object]) -> Path:
        """Pause the VM, save its state under ``key``. The caller resumes it (``cont``).

        Call with :meth:`writer_lock` held for ``key``.
        """
        target = self.root / key
        private_dir(target)
        for stale in target.glob(f".{STATE_FILE}.*.tmp"):  # a writer that died; we hold the lock
            stale.unlink(missing_ok=True)
        tmp = target / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            await qmp.execute("stop")
            with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                qmp.send_fd_scm(f.fileno())
                await qmp.execute("getfd", {"fdname": "warden-snapshot"})
                await qmp.execute("migrate", {"uri": "fd:warden-snapshot"})
                await _wait_migration(qmp)
                f.flush()
                os.fsync(f.fileno())
            write_private(target / META_FILE, json.dumps({**meta, "created": time.time()}).encode())
            tmp.replace(target / STATE_FILE)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return target / STATE_FILE


async def _wait_migration(qmp: QMPClient) -> None:
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc", status) if isinstance(info, dict) else status
            raise VMError(f"saving the boot snapshot failed: {desc}")
        if time.monotonic() > deadline:
            raise VMError(f"saving the boot snapshot took over {MIGRATE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)
