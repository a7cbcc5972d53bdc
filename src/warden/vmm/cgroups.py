"""Per-VM cgroup (v1) limits on the QEMU process: memory, CPU time and tasks.

QEMU's own ``-m`` and ``-smp`` bound what the guest sees; the cgroup bounds what the whole
QEMU process may take of the host, its own overhead included (the TCG translation cache,
device state, I/O threads). Applied where the host allows it (cgroup v1 controllers mounted
under /sys/fs/cgroup and writable); elsewhere VMs run without them and :func:`available` says
why. Stdlib only: :mod:`warden.vmm.ownership` (and so the janitor) removes stale groups.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "warden"
CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
CPU_SLACK = 0.5
"""CPU beyond the vCPUs, for QEMU's main loop and I/O threads (in CPUs)."""
PIDS_MAX = 512
"""QEMU's threads: vCPUs, the main loop, RCU, and a pool of up to 64 I/O workers per disk."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_quota_us: int
    pids: int = PIDS_MAX

    @classmethod
    def for_vm(cls, memory_mib: int, vcpus: int, overhead_mib: int) -> Limits:
        return cls(
            memory_bytes=(memory_mib + overhead_mib) << 20,
            cpu_quota_us=int((vcpus + CPU_SLACK) * CPU_PERIOD_US),
        )


def available(root: Path = ROOT) -> str | None:
    """None if per-VM cgroups can be made here, else why not."""
    for controller in CONTROLLERS:
        base = root / controller
        if not (base / "cgroup.procs").exists():
            return f"the cgroup v1 {controller} controller is not mounted at {base}"
        if not os.access(base, os.W_OK):
            return f"{base} is not writable (run as root)"
    return None


class VMCgroup:
    """The cgroups of one VM: ``<root>/<controller>/warden/<vm id>``."""

    def __init__(self, vm_id: str, root: Path = ROOT) -> None:
        self.vm_id = vm_id
        self.root = root

    def path(self, controller: str) -> Path:
        return self.root / controller / PARENT / self.vm_id

    def create(self, limits: Limits) -> None:
        """Make the groups and set their limits; on any failure remove what was made."""
        try:
            for controller in CONTROLLERS:
                self.path(controller).mkdir(parents=True, exist_ok=True)
            self._write("memory", "memory.limit_in_bytes", limits.memory_bytes)
            self._write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", limits.cpu_quota_us)
            self._write("pids", "pids.max", limits.pids)
        except OSError:
            self.remove()
            raise

    def attach(self, pid: int) -> None:
        for controller in CONTROLLERS:
            self._write(controller, "cgroup.procs", pid)

    def remove(self, *, wait_s: float = 2.0) -> None:
        """Remove the groups once their last process has left. Safe to call twice.

        A process killed a moment ago may still be exiting, and the kernel refuses (EBUSY)
        to remove a group it is in: retry for up to ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        for controller in CONTROLLERS:
            while True:
                try:
                    self.path(controller).rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)

    def _write(self, controller: str, name: str, value: int) -> None:
        (self.path(controller) / name).write_text(f"{value}\n")


def sweep_empty(root: Path = ROOT, *, min_age_s: float = 60.0) -> None:
    """Remove warden VM groups that hold no process (left by a crash).

    Only groups older than ``min_age_s``: a VM being launched right now has an empty group
    for the few milliseconds between making it and spawning QEMU into it.
    """
    base = root / "memory" / PARENT
    if not base.is_dir():
        return
    now = time.time()
    for entry in base.iterdir():
        if not entry.is_dir() or now - entry.stat().st_mtime < min_age_s:
            continue
        if not (entry / "cgroup.procs").read_text().strip():
            VMCgroup(entry.name, root).remove(wait_s=0)
