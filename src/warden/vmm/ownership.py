"""Who owns a VM, and what happens to it when its owner dies. The one place for that rule.

* ``EMBEDDED``: the VM belongs to the Python process that made it. QEMU runs under
  ``setpriv --pdeathsig KILL``, so the kernel kills it when its owner dies, even by SIGKILL.
  A janitor process per owner (``python -m warden.vmm.janitor``) waits on a pipe from the owner;
  when the owner is gone it removes the owner's runtime dirs. Anything left anyway (a host
  crash) is swept by :func:`sweep_stale` on the next start.
* ``DAEMON``: the VM outlives its creator (the manager daemon of a later issue): QEMU gets its
  own session and no parent-death signal.

Every runtime dir holds ``owner.json`` naming the owner's pid and its start time, the QEMU
pid and its start time, and the VM's uid (:mod:`warden.jail.ids`), so a recycled pid is never
mistaken for the owner and nothing is killed by name. A QEMU is killed only through a pidfd
opened and then checked (start time, and a command line naming the runtime dir): the pidfd
stays bound to that one process even if the pid is reused afterwards.

The janitor (``vmm/janitor.py``) imports this module only once its owner is gone.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from warden.config import Paths
from warden.jail import ids
from warden.vmm import cgroups
from warden.vmm.cgroups import VMCgroup
from warden.vmm.channel_keys import forget_vm

OWNER_FILE = "owner.json"


class Ownership(enum.StrEnum):
    EMBEDDED = "embedded"
    DAEMON = "daemon"


def spawn_prefix(ownership: Ownership) -> list[str]:
    """The argv prefix that ties a QEMU process's life to its owner."""
    if ownership is Ownership.EMBEDDED:
        return ["setpriv", "--pdeathsig", "KILL", "--"]
    return []


def new_session(ownership: Ownership) -> bool:
    """Whether QEMU gets a session of its own (so terminal signals don't reach it)."""
    return ownership is Ownership.DAEMON


def proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parens; fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, start_time: int | None) -> bool:
    current = proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def claim(rundir: Path, ownership: Ownership) -> None:
    """Record the calling process as the owner of ``rundir``."""
    pid = os.getpid()
    _write_owner(
        rundir,
        {"ownership": ownership.value, "owner_pid": pid, "owner_start": proc_start_time(pid)},
    )
    if ownership is Ownership.EMBEDDED:
        _ensure_janitor(rundir.parent)


def record_qemu(rundir: Path, pid: int, start: int | None = None) -> None:
    data = read_owner(rundir) or {}
    data["qemu_pid"] = pid
    data["qemu_start"] = start if start is not None else proc_start_time(pid)
    _write_owner(rundir, data)


def record_uid(rundir: Path, uid: int) -> None:
    """Record the VM's claimed uid, so that whoever releases the dir frees the claim."""
    data = read_owner(rundir) or {}
    data["uid"] = uid
    _write_owner(rundir, data)


def recorded_uid(rundir: Path) -> int | None:
    """The uid recorded for the VM of ``rundir`` (:func:`record_uid`), if any."""
    return _int((read_owner(rundir) or {}).get("uid"))


def read_owner(rundir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((rundir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_owner(rundir: Path, data: dict[str, object]) -> None:
    tmp = rundir / f".{OWNER_FILE}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))
    tmp.replace(rundir / OWNER_FILE)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def owner_alive(rundir: Path) -> bool:
    data = read_owner(rundir)
    if data is None:
        return False
    pid = _int(data.get("owner_pid"))
    return pid is not None and is_alive(pid, _int(data.get("owner_start")))


def release(rundir: Path, *, grace_s: float = 2.0) -> None:
    """Kill the VM of ``rundir`` by its recorded pid if it still runs, remove the dir and its
    cgroups, and free its uid."""
    data = read_owner(rundir) or {}
    pid = _int(data.get("qemu_pid"))
    gone = True
    if pid is not None:
        gone = kill_verified(pid, _int(data.get("qemu_start")), rundir, grace_s)
    VMCgroup(rundir.name).remove()
    shutil.rmtree(rundir, ignore_errors=True)
    uid = _int(data.get("uid"))
    if uid is not None and gone:  # a QEMU that outlived its kill keeps its uid (swept later)
        ids.release(rundir.parent, uid, rundir.name)
    if gone:  # run/vms/<id> -> the data dir: no one reattaches to this VM any more
        paths = Paths(rundir.parent.parent.parent)
        forget_vm(paths, rundir.name)
        shutil.rmtree(paths.paused / rundir.name, ignore_errors=True)  # a paused VM's state


def open_verified(pid: int, start: int | None, rundir: Path) -> int | None:
    """A pidfd of ``pid`` if that process is still the one started at ``start`` and its
    command line names ``rundir``; else None.

    The pidfd is opened first and checked after: if the check passes, the process it refers
    to held the pid all along, and the pidfd stays bound to it even if the pid is reused.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    current = proc_start_time(pid)
    if current is None or (start is not None and current != start):
        os.close(fd)
        return None
    if str(rundir).encode() not in cmdline:
        os.close(fd)
        return None
    return fd


def kill_verified(pid: int, start: int | None, rundir: Path, grace_s: float) -> bool:
    """SIGKILL the VM process ``pid`` (checked by :func:`open_verified`) and wait up to
    ``grace_s`` for it to exit. Returns whether it is gone (or was never there)."""
    fd = open_verified(pid, start, rundir)
    if fd is None:
        return not is_alive(pid, start) or start is None
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(int(grace_s * 1000)))
    finally:
        os.close(fd)


def sweep_stale(vms_dir: Path, *, owner_pid: int | None = None) -> list[Path]:
    """Release runtime dirs whose owner is dead (or, with ``owner_pid``, owned by that pid)."""
    swept: list[Path] = []
    with contextlib.suppress(OSError):
        cgroups.sweep_empty()
    if not vms_dir.is_dir():
        return swept
    for rundir in sorted(vms_dir.iterdir()):
        if rundir.is_dir() and _stale(rundir, owner_pid):
            release(rundir)
            swept.append(rundir)
    with contextlib.suppress(OSError):
        ids.sweep_orphans(vms_dir)
    return swept


def _stale(rundir: Path, owner_pid: int | None) -> bool:
    """Whether ``sweep_stale`` releases the runtime dir ``rundir``."""
    data = read_owner(rundir)
    if owner_pid is not None:
        # A daemon's VMs outlive it; its janitor (started by an embedded VM of the same
        # process, such as the footprint calibration) must leave them alone.
        return (
            data is not None
            and _int(data.get("owner_pid")) == owner_pid
            and data.get("ownership") != Ownership.DAEMON.value
        )
    if data is None:
        # A dir being created right now has no owner.json for a moment; leave young ones.
        try:
            return time.time() - rundir.stat().st_mtime >= 60
        except OSError:
            return True
    return data.get("ownership") != Ownership.DAEMON.value and not owner_alive(rundir)


_janitor_lock = threading.Lock()
_janitor_pipe: dict[Path, int] = {}


def _ensure_janitor(vms_dir: Path) -> None:
    """Start this process's janitor for ``vms_dir`` once. It outlives us by design."""
    with _janitor_lock:
        if vms_dir in _janitor_pipe:
            return
        read_fd, write_fd = os.pipe()  # both close-on-exec; QEMU never inherits them
        try:
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "warden.vmm.janitor",
                    "--fd",
                    str(read_fd),
                    "--owner",
                    str(os.getpid()),
                    "--dir",
                    str(vms_dir),
                ],
                pass_fds=(read_fd,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        # The write end stays open for the life of this process; its closing is the signal.
        _janitor_pipe[vms_dir] = write_fd
