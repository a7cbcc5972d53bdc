"""CPU use of processes (vmm/usage.py), measured on real processes of this host."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from warden.vmm.usage import CpuMeter, cpu_seconds


def test_cpu_seconds_of_a_missing_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_seconds(child.pid) is None
    assert (cpu_seconds(os.getpid()) or 0) > 0


def test_the_meter_tells_a_busy_process_from_an_idle_one() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(["sleep", "30"])
    try:
        meter = CpuMeter()
        meter.sample([busy.pid, idle.pid])
        assert meter.percent(busy.pid) is None  # one sample is no interval yet
        time.sleep(1.0)
        meter.sample([busy.pid, idle.pid])
        busy_percent, idle_percent = meter.percent(busy.pid), meter.percent(idle.pid)
        assert busy_percent is not None and busy_percent > 40, busy_percent
        assert idle_percent is not None and idle_percent < 5, idle_percent
        meter.sample([idle.pid])  # the busy one is no longer asked for: forgotten
        assert meter.percent(busy.pid) is None
        assert meter.percent(None) is None
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()


def test_the_meter_takes_readings_made_by_its_caller() -> None:
    """The daemon reads each QEMU's CPU time once a second, for admission and ``ps`` both."""
    meter = CpuMeter()
    meter.record({10: 1.0, 11: None})
    time.sleep(0.1)
    meter.record({10: 1.05, 11: 2.0})
    percent = meter.percent(10)
    assert percent is not None and 0 < percent <= 50, percent  # 0.05 s in 0.1 s or more
    assert meter.percent(11) is None  # gone at the first reading: one reading only
