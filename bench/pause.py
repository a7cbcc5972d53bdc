"""Auto-pause and pause/resume rows of ``make bench`` (``--only pause``).

* idle CPU of N auto-paused VMs (QMP ``stop`` by the idle timer) against the same N VMs
  unpaused, measured in the same run, alternating phases, from their QEMUs' utime+stime;
* what a continue adds to the first exec after an idle stop, against an exec after the same
  idle time without a stop (same VM, alternating);
* pause to disk and resume of a 256 MiB VM (seconds, and the saved state's size).

N defaults to the issue's 100 (clones of the boot template: the whole section took 3 min
here; ``--pause-vms 20`` for a shorter run).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

from warden.vmm.machine import Machine
from warden.vmm.pause import PausedStates
from warden.vmm.spec import VMSpec

IDLE_S = 0.5
CPU_WINDOW_S = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


async def _window_cpu(machines: list[Machine]) -> float:
    """CPU seconds per second that the machines' QEMUs used over CPU_WINDOW_S, as % of a core."""
    pids = [m.pid for m in machines if m.pid]
    before, t0 = _cpu_seconds(pids), time.monotonic()
    await asyncio.sleep(CPU_WINDOW_S)
    return 100 * (_cpu_seconds(pids) - before) / (time.monotonic() - t0)


async def _set_auto_pause(machines: list[Machine], idle_s: float | None) -> None:
    for m in machines:
        m.idle.configure(idle_s)
        if idle_s is None:
            await m.idle.wake()
    if idle_s is not None:
        deadline = time.monotonic() + 30
        while not all(m.idle.stopped for m in machines):
            assert time.monotonic() < deadline, "the idle VMs were not all stopped"
            await asyncio.sleep(0.1)
    else:
        await asyncio.sleep(2.0)  # let the continued guests settle


async def bench_idle_cpu(n: int, rounds: int = 2) -> dict[str, Any]:
    machines: list[Machine] = []
    try:
        for _ in range(n):
            m = Machine(VMSpec.parse(memory_mib=256))
            await m.launch()
            await m.agent.exec(["true"])  # past the first exec's translation cost
            machines.append(m)
        paused: list[float] = []
        running: list[float] = []
        for _ in range(rounds):
            await _set_auto_pause(machines, None)
            running.append(await _window_cpu(machines))
            await _set_auto_pause(machines, IDLE_S)
            paused.append(await _window_cpu(machines))
        await _set_auto_pause(machines, None)
        for m in machines:  # they all still answer
            assert (await m.agent.exec(["echo", "ok"])).stdout == b"ok\n"
    finally:
        await asyncio.gather(*(m.shutdown() for m in machines), return_exceptions=True)
    w, p = statistics.median(paused), statistics.median(running)
    return {
        "metric": f"idle CPU of {n} auto-paused VMs (% of a core)",
        "warden": round(w, 3),
        "peer": round(p, 3),
        "ratio": round(w / p, 4) if p else None,  # unpaused below one clock tick: no ratio
        "lower_is_better": True,
        "peer_is": f"the same {n} VMs unpaused",
        "target": "<= 0.1x",
        "pass": w <= 0.1 * p,  # with both nil too: stopping them cannot cost more
        "warden_samples": [round(x, 3) for x in paused],
        "peer_samples": [round(x, 3) for x in running],
    }


async def _exec_ms(machine: Machine) -> float:
    t0 = time.perf_counter()
    result = await machine.agent.exec(["true"])
    assert result.exit_code == 0
    return (time.perf_counter() - t0) * 1e3


async def bench_first_exec(rounds: int) -> dict[str, Any]:
    machine = Machine(VMSpec.parse(memory_mib=256))
    await machine.launch()
    stopped: list[float] = []
    awake: list[float] = []
    conts: list[float] = []
    try:
        for _ in range(5):
            await _exec_ms(machine)  # warm up
        for _ in range(rounds):
            machine.idle.configure(IDLE_S)
            while not machine.idle.stopped:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            stopped.append(await _exec_ms(machine))
            conts.append(machine.idle.last_cont_s * 1e3)
            machine.idle.configure(None)
            await asyncio.sleep(IDLE_S + 0.3)  # the same idle time, not stopped
            awake.append(await _exec_ms(machine))
    finally:
        await machine.shutdown()
    w, p = statistics.median(stopped), statistics.median(awake)
    return {
        "metric": "first exec after idle, auto-paused (ms)",
        "warden": round(w, 3),
        "peer": round(p, 3),
        "ratio": round(w / p, 3),
        "lower_is_better": True,
        "peer_is": "an exec after the same idle time without the stop",
        "added_ms_p50": round(w - p, 3),
        "cont_ms_p50": round(statistics.median(conts), 3),
        "target": "<= +5 ms",
        "pass": w - p <= 5.0,
        "warden_samples": [round(x, 3) for x in stopped],
        "peer_samples": [round(x, 3) for x in awake],
    }


async def bench_pause_to_disk(rounds: int) -> dict[str, Any]:
    machine = Machine(VMSpec.parse(memory_mib=256))
    await machine.launch()
    pauses: list[float] = []
    resumes: list[float] = []
    size = 0
    try:
        await machine.agent.exec(["true"])
        for _ in range(rounds):
            t0 = time.perf_counter()
            await machine.pause()
            pauses.append(time.perf_counter() - t0)
            size = PausedStates(machine.paths).path(machine.id).stat().st_size
            t0 = time.perf_counter()
            await machine.resume()
            await machine.agent.exec(["true"])
            resumes.append(time.perf_counter() - t0)
    finally:
        await machine.shutdown()
    return {
        "metric": "pause to disk / resume to first exec, 256 MiB (s)",
        "warden": round(statistics.median(pauses), 3),
        "peer": round(statistics.median(resumes), 3),
        "ratio": 0.0,
        "lower_is_better": True,
        "peer_is": "not a baseline: 'warden' is the pause, 'peer' the resume to first exec",
        "state_mib": round(size / 2**20, 1),
        "warden_samples": [round(x, 3) for x in pauses],
        "peer_samples": [round(x, 3) for x in resumes],
    }


async def bench_pause(n: int, rounds: int) -> list[dict[str, Any]]:
    return [
        await bench_first_exec(rounds),
        await bench_pause_to_disk(max(3, rounds // 4)),
        await bench_idle_cpu(n),
    ]
