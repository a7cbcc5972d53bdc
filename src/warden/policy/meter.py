"""What each VM really uses, for admission (``charge="measured"``): CPU load over a window and
memory (PSS), sampled by the daemon.

* CPU: the QEMU process's CPU time (``/proc/<pid>/stat``: every thread, vCPUs and I/O, which
  is what its cgroup's cpuacct counts too, and works without cgroups), sampled every second;
  the load is the CPU time used over the last ``WINDOW_S`` divided by the time. A VM is
  measured once its samples span a whole window.
* Memory: the QEMU process's PSS (``/proc/<pid>/smaps_rollup``: shared pages, such as a
  template's RAM mapped by its clones, are split between the processes that map them). Reading
  it walks the process's page tables (~1.5 ms of CPU per VM), so a VM is read again after
  ``MEMORY_EVERY_S`` only if its QEMU used CPU since its last reading, and after
  ``MEMORY_IDLE_EVERY_S`` in any case: a process that runs not at all touches no new memory
  (what changes its PSS then is only how many others share its pages). Each VM is read when
  it is due, so 200 idle VMs cost about 7 readings a second, not 200 at once every 5 s (at
  ~1.5 ms each: ~1% of a core against 6%, in bursts of 0.3 s; computed, not measured). Only
  a sample taken ``SETTLE_S`` or more after the VM began running counts: a VM that is booting
  or restoring is still growing.

Until then admission charges the VM as not measured (its calibrated footprint or its limit for
memory, all of its vCPUs), so a burst of creates is decided against full charges.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping

from warden.policy.admission import VMUsage
from warden.vmm.usage import cpu_seconds

WINDOW_S = 5.0
SETTLE_S = 5.0
MEMORY_EVERY_S = 5.0
MEMORY_IDLE_EVERY_S = 30.0


def pss_mib(pid: int) -> float | None:
    """The PSS of process ``pid`` in MiB, or None if it does not run (or hides it)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class UsageMeter:
    """Samples of the running VMs (by id), and their usage as admission charges it.

    ``sample_cpu`` and ``sample_memory`` are given the VMs running now (id -> QEMU pid); a VM
    not given is forgotten (a VM that comes back starts over, unmeasured). Thread-safe:
    admission reads it from the store's worker thread.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}
        self._cpu: dict[str, collections.deque[tuple[float, float]]] = {}
        self._pss: dict[str, tuple[float, float, float | None]] = {}
        """VM id -> (when, PSS in MiB, the QEMU's CPU seconds then)."""

    def sample_cpu(
        self, running: Mapping[str, int], read: Callable[[int], float | None] = cpu_seconds
    ) -> dict[str, float | None]:
        """Read the CPU time of ``running``; returns the readings (None: gone)."""
        now = self._clock()
        taken = {vm_id: read(pid) for vm_id, pid in running.items()}
        with self._lock:
            self._forget(running)
            for vm_id, used in taken.items():
                if used is None:
                    continue
                self._since.setdefault(vm_id, now)
                samples = self._cpu.setdefault(vm_id, collections.deque())
                samples.append((now, used))
                while len(samples) > 2 and samples[1][0] <= now - WINDOW_S:
                    samples.popleft()  # keep one sample at or before the window's start
        return taken

    def memory_due(self, running: Mapping[str, int]) -> dict[str, int]:
        """Those of ``running`` whose PSS is to be read now (see the module's docstring)."""
        now = self._clock()
        with self._lock:
            return {vm_id: pid for vm_id, pid in running.items() if self._due(vm_id, now)}

    def _due(self, vm_id: str, now: float) -> bool:
        since = self._since.get(vm_id)
        if since is None or now - since < SETTLE_S:
            return False  # not counted yet
        last = self._pss.get(vm_id)
        if last is None:
            return True
        age = now - last[0]
        if age >= MEMORY_IDLE_EVERY_S:
            return True
        return age >= MEMORY_EVERY_S and self._cpu_seconds(vm_id) != last[2]

    def _cpu_seconds(self, vm_id: str) -> float | None:
        samples = self._cpu.get(vm_id)
        return samples[-1][1] if samples else None

    def sample_memory(
        self, running: Mapping[str, int], read: Callable[[int], float | None] = pss_mib
    ) -> None:
        """Read the PSS of ``running`` (those :meth:`memory_due` gave, or any)."""
        taken = {vm_id: read(pid) for vm_id, pid in running.items()}
        now = self._clock()
        with self._lock:
            for vm_id, pss in taken.items():
                since = self._since.get(vm_id)
                if pss is not None and since is not None and now - since >= SETTLE_S:
                    self._pss[vm_id] = (now, pss, self._cpu_seconds(vm_id))

    def _forget(self, running: Mapping[str, int]) -> None:
        for table in (self._since, self._cpu, self._pss):
            for vm_id in [v for v in table if v not in running]:
                del table[vm_id]

    def usage(self, vm_id: str, memory_mib: int, vcpus: int, *, paused: bool = False) -> VMUsage:
        """``vm_id`` as admission charges it: measured where it has been, else not."""
        with self._lock:
            samples = self._cpu.get(vm_id)
            load = None
            if samples and samples[-1][0] - samples[0][0] >= WINDOW_S:
                (t0, c0), (t1, c1) = samples[0], samples[-1]
                load = max(0.0, (c1 - c0) / (t1 - t0))
            pss = self._pss.get(vm_id)
        return VMUsage(
            memory_mib=memory_mib,
            vcpus=vcpus,
            pss_mib=None if pss is None else pss[1],
            cpu_load=load,
            paused=paused,
        )
