"""CPU use of VMM processes, read from ``/proc/<pid>/stat``: the ``CPU%`` of ``warden ps``.

A :class:`CpuMeter` is sampled periodically (the manager does it every second) and reports, per
pid, the CPU time used over the last interval as a percentage of one CPU (as ``top`` does: a
VM with two busy vCPUs shows about 200).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` so far, or None if it does not run."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parens; fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime


class CpuMeter:
    """CPU use per pid over the last sampling interval, in percent of one CPU."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (monotonic time, cpu seconds)
        self._percent: dict[int, float] = {}

    def sample(self, pids: Iterable[int]) -> None:
        """Take a sample of ``pids``; pids not given any more are forgotten."""
        self.record({pid: cpu_seconds(pid) for pid in pids})

    def record(self, readings: Mapping[int, float | None]) -> None:
        """Take a sample from ``readings`` (pid -> its CPU seconds, None: gone), read by the
        caller; pids not in it are forgotten."""
        now = time.monotonic()
        last, self._last = self._last, {}
        percent, self._percent = self._percent, {}
        for pid, used in readings.items():
            if used is None:
                continue
            self._last[pid] = (now, used)
            before = last.get(pid)
            if before is not None and now > before[0]:
                self._percent[pid] = max(0.0, (used - before[1]) / (now - before[0]) * 100)
            elif pid in percent:
                self._percent[pid] = percent[pid]

    def percent(self, pid: int | None) -> float | None:
        """The last interval's CPU use of ``pid``; None before its second sample."""
        return None if pid is None else self._percent.get(pid)
