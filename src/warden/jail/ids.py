"""Each VM's own unprivileged uid and gid, from a range that warden owns.

A uid is claimed by creating ``$WARDEN_HOME/run/uids/<uid>`` with ``O_EXCL`` (so two
launches, in one process or in many, never get the same one); the file names the VM. The gid
is the same number. A claim is released when its VM's runtime dir is removed
(:func:`warden.vmm.ownership.release`, ``Machine`` cleanup), and a claim whose VM's runtime
dir is gone (its owner was killed between the two steps) is swept once no process runs as
that uid any more.

Stdlib only: the janitor imports it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

FIRST_UID = 400_000
COUNT = 65_536
"""The range: 400000-465535, far above the ids of users (and of /etc/subuid's usual
100000-165535 for containers); ``warden doctor`` checks that /etc/passwd and /etc/group
do not use it."""

CLAIMS_DIR = "uids"
"""Under ``$WARDEN_HOME/run/``, next to ``vms/``."""

ORPHAN_AGE_S = 60.0
"""A claim without a runtime dir is left alone this long: the launch that made it may be
between making the claim and recording it in ``owner.json``."""


class NoFreeUidError(OSError):
    """Every uid of the range is claimed."""


def claims_dir(vms_dir: Path) -> Path:
    return vms_dir.parent / CLAIMS_DIR


def in_range(uid: int) -> bool:
    return FIRST_UID <= uid < FIRST_UID + COUNT


def claim(vms_dir: Path, vm_id: str) -> int:
    """Claim a free uid for ``vm_id``; return it. Raises NoFreeUidError if none is free."""
    base = claims_dir(vms_dir)
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    os.chmod(base, 0o700)
    start = secrets.randbelow(COUNT)
    for i in range(COUNT):
        uid = FIRST_UID + (start + i) % COUNT
        try:
            fd = os.open(
                base / str(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(vm_id)
        return uid
    raise NoFreeUidError(f"every uid of {FIRST_UID}-{FIRST_UID + COUNT - 1} is claimed")


def release(vms_dir: Path, uid: int, vm_id: str | None = None) -> None:
    """Free ``uid``; with ``vm_id``, only if that VM holds it."""
    path = claims_dir(vms_dir) / str(uid)
    if vm_id is not None and holder(vms_dir, uid) not in (vm_id, None):
        return
    path.unlink(missing_ok=True)


def holder(vms_dir: Path, uid: int) -> str | None:
    try:
        return (claims_dir(vms_dir) / str(uid)).read_text()
    except OSError:
        return None


def claimed(vms_dir: Path) -> dict[int, str]:
    """Every claimed uid and the VM holding it."""
    base = claims_dir(vms_dir)
    result: dict[int, str] = {}
    if not base.is_dir():
        return result
    for entry in base.iterdir():
        if entry.name.isdigit() and in_range(int(entry.name)):
            with contextlib.suppress(OSError):
                result[int(entry.name)] = entry.read_text()
    return result


def uids_in_use() -> set[int]:
    """The real uids of every process of this host (from /proc/PID/status)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        found.add(int(line.split()[1]))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return found


def sweep_orphans(vms_dir: Path, *, min_age_s: float = ORPHAN_AGE_S) -> list[int]:
    """Free the claims whose VM has no runtime dir any more, unless a process still runs as
    that uid (a QEMU that could not be killed keeps its uid)."""
    base = claims_dir(vms_dir)
    orphans: list[int] = []
    now = time.time()
    for uid, vm_id in claimed(vms_dir).items():
        if (vms_dir / vm_id).is_dir():
            continue
        with contextlib.suppress(OSError):
            if now - (base / str(uid)).stat().st_mtime >= min_age_s:
                orphans.append(uid)
    if not orphans:
        return []
    busy = uids_in_use()
    freed = [uid for uid in orphans if uid not in busy]
    for uid in freed:
        (base / str(uid)).unlink(missing_ok=True)
    return freed


def conflicts(passwd: Path = Path("/etc/passwd"), group: Path = Path("/etc/group")) -> list[str]:
    """Users and groups of this host whose id is in warden's range (it must be warden's)."""
    found: list[str] = []
    for path, kind in ((passwd, "user"), (group, "group")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit() and in_range(int(fields[2])):
                found.append(f"{kind} {fields[0]} ({fields[2]}) in {path}")
    return found
