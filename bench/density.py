"""Issue 8: density and instant start, each row against its baseline from the same run.

* create from the warm pool to first output, p50 and p95 (a daemon with ``--pool T=K``),
  against a cold boot and a default create (a clone of the boot template, which replaced the
  boot-snapshot restore) (target p50 <= 50 ms and >= 20x faster than cold);
* creates per second from the pool, ``--burst`` in a row (target >= 10/s), the pool sized to
  hold them all;
* PSS per idle clone of a 256 MiB template, QEMU included, against a cold VM of the same size
  (target <= 0.25x, 0.15x stretch);
* idle 256 MiB clones held at once on a daemon with default admission, each answering exec
  within 2x a lone VM's p50 (target >= 200): clones are created until admission refuses or
  ``--hold`` is reached, each runs ``true`` (a first command, as a pool member's warm-up),
  all idle 5 s, then each runs ``true`` again, timed; once as they are, once on a daemon
  that stops idle VMs (``--auto-pause``, ``hold-paused``). The lone VM's p50 is taken the
  same way, on the same daemon before the others exist: a clone warmed up, then ``true``
  after 5 s idle, LONE_IDLE_RUNS times (and the same past the auto-pause delay on that
  daemon); its back-to-back p50 (30 execs in a row, the baseline of the earlier runs) and the
  count within 2x of it are reported too.

Run with ``python -m bench.density``; results go to ``bench/results/density-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.daemon import Daemon
from bench.run import RESULTS, pct
from warden._errors import AdmissionError
from warden.config import Paths
from warden.sdk import AsyncSandbox
from warden.vmm.templates import Templates

TEMPLATE = "bench-density"
POOL_P50_TARGET_S = 0.05
REFUSALS = 4
LONE_IDLE_RUNS = 8
"""Execs of the lone clone after an idle pause as long as the held clones' (its p50 is the
baseline: the same exec in the same conditions, on a host without the other clones)."""
RETRY_S = 3.0


def _pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for {pid}")


async def _first_output(create: Any) -> tuple[float, AsyncSandbox]:
    t0 = time.perf_counter()
    sbx = await create()
    r = await sbx.commands.run(["echo", "ready"])
    assert r.stdout == "ready\n", r
    return time.perf_counter() - t0, sbx


async def _make_template() -> None:
    store = Templates(Paths.from_env())
    if store.exists(TEMPLATE):
        store.remove(TEMPLATE)
    # Booted cold: a clone's private RAM would go into the template's device state, and the
    # template's clones would share less of it.
    async with await AsyncSandbox.create(memory_mib=256, boot="cold") as sbx:
        await sbx.commands.run(["true"])
        await sbx.save_template(TEMPLATE)


async def _wait_pool(d: Daemon, ready: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = (await d.client.get("/v1/info")).json()["pools"]
        if pools.get(TEMPLATE, {}).get("ready", 0) >= ready:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the pool never had {ready} ready members")


async def bench_pool(runs: int) -> list[dict[str, Any]]:
    """Pool create to first output (daemon), against cold boot (embedded) and a default create
    on the same daemon (no template named: a clone of the boot template of its shape, which
    replaced the boot-snapshot restore)."""
    import warden

    cold: list[float] = []
    restore: list[float] = []
    pool: list[float] = []
    d = Daemon("--pool", f"{TEMPLATE}=2")
    try:
        client = warden.connect(f"unix://{d.socket}")
        for _ in range(runs):
            await _wait_pool(d, 2, 120)
            took, sbx = await _first_output(lambda: client.AsyncSandbox.create(template=TEMPLATE))
            pool.append(took)
            await sbx.kill()
            took, sbx = await _first_output(client.AsyncSandbox.create)
            restore.append(took)
            await sbx.kill()
            took, sbx = await _first_output(lambda: AsyncSandbox.create(boot="cold"))
            cold.append(took)
            await sbx.kill()
    finally:
        await d.close()
    p50 = statistics.median(pool)
    return [
        _row("pool: create to first output, p50 (s)", pool, cold, "cold boot"),
        {
            **_row("  pool p95 (s), peer: default create p95", [pct(pool, 0.95)],
                   [pct(restore, 0.95)], "default create: boot-template clone (daemon)"),
        },
        {
            **_row("  pool p50 vs default create (s)", pool, restore,
                   "default create: boot-template clone (daemon)"),
            "target": f"p50 <= {POOL_P50_TARGET_S * 1000:.0f} ms and >= 20x faster than cold",
            "pass": p50 <= POOL_P50_TARGET_S and statistics.median(cold) / p50 >= 20,
        },
    ]  # fmt: skip


async def bench_burst(burst: int) -> list[dict[str, Any]]:
    """``burst`` creates in a row from a pool that holds them all."""
    import warden

    d = Daemon("--pool", f"{TEMPLATE}={burst}")
    made: list[Any] = []
    try:
        await _wait_pool(d, burst, 60.0 + 5.0 * burst)
        client = warden.connect(f"unix://{d.socket}")
        t0 = time.perf_counter()
        for _ in range(burst):
            made.append(await client.AsyncSandbox.create(template=TEMPLATE))
        elapsed = time.perf_counter() - t0
        for sbx in made:
            await sbx.kill()
    finally:
        await d.close()
    rate = burst / elapsed
    return [
        {
            "metric": f"pool: creates per second, {burst} in a row",
            "warden": round(rate, 2),
            "peer": None,
            "ratio": None,
            "target": ">= 10/s",
            "pass": rate >= 10,
        }
    ]


async def bench_pss(clones: int) -> list[dict[str, Any]]:
    """PSS per idle clone (``clones`` at once) against a cold VM, all 256 MiB, embedded."""
    from warden.vmm.machine import Machine

    async with await AsyncSandbox.create(boot="cold", memory_mib=256) as cold:
        await cold.commands.run(["true"])
        await asyncio.sleep(3)
        machine = cold._machine
        assert isinstance(machine, Machine) and machine.pid
        cold_pss = _pss_mib(machine.pid)
    held = [await AsyncSandbox.create(template=TEMPLATE) for _ in range(clones)]
    try:
        for sbx in held:
            await sbx.commands.run(["true"])
        await asyncio.sleep(3)
        per_clone = []
        for sbx in held:
            m = sbx._machine
            assert isinstance(m, Machine) and m.pid
            per_clone.append(_pss_mib(m.pid))
    finally:
        for sbx in held:
            await sbx.kill()
    mean = statistics.mean(per_clone)
    return [
        {
            "metric": f"PSS per idle clone of 256 MiB, {clones} held (MiB)",
            "warden": round(mean, 1),
            "peer": round(cold_pss, 1),
            "ratio": round(mean / cold_pss, 3),
            "peer_is": "a cold-booted 256 MiB VM, idle",
            "target": "<= 0.25x (0.15x stretch)",
            "pass": mean / cold_pss <= 0.25,
            "warden_samples": [round(x, 1) for x in per_clone],
        }
    ]


async def bench_hold(limit: int, auto_pause_s: float | None) -> list[dict[str, Any]]:
    """Clones held at once under default admission (until refused or ``limit``), and how
    many answer exec within 2x a lone clone's p50; with ``auto_pause_s``, the daemon stops
    VMs idle that long (``--auto-pause``), so idle ones cost no CPU."""
    import warden

    d = Daemon(*(["--auto-pause", str(auto_pause_s)] if auto_pause_s else []))
    ids: list[str] = []
    try:
        client = warden.connect(f"unix://{d.socket}")
        idle_s = 5 + (auto_pause_s or 0)
        lone = await client.AsyncSandbox.create(template=TEMPLATE)
        hot_p50 = statistics.median([await _exec_s(lone) for _ in range(30)])
        lone_p50 = statistics.median(await _idle_execs(lone, idle_s, LONE_IDLE_RUNS))
        await lone.kill()
        held, refused = await _create_until_refused(client, limit)
        ids = [s.id for s in held]
        for sbx in held:  # each has run a command (as a pool member has): warm, then idle
            await sbx.commands.run(["true"])
        await asyncio.sleep(idle_s)
        t0 = time.perf_counter()
        started, times = [], []
        for sbx in held:
            started.append(time.perf_counter() - t0)
            times.append(await _exec_s(sbx))
        within = sum(1 for t in times if t <= 2 * lone_p50)
        within_hot = sum(1 for t in times if t <= 2 * hot_p50)
        for sbx in held:
            await sbx.kill()
    finally:
        await _remove_all(d, ids)
        await d.close()
    return [
        {
            "metric": "idle 256 MiB clones held, exec within 2x lone p50"
            + (f", auto-pause {auto_pause_s:g} s" if auto_pause_s else ", no auto-pause"),
            "warden": within,
            "peer": len(times),
            "ratio": None,
            "peer_is": f"clones held in all (a lone clone's exec after {idle_s:g} s idle, as "
            f"the held ones', p50 {lone_p50 * 1000:.1f} ms; back to back {hot_p50 * 1000:.1f} "
            f"ms, {within_hot} held within 2x that; stopped by: {refused or f'--hold {limit}'})",
            "lone_idle_p50_ms": round(lone_p50 * 1000, 1),
            "lone_hot_p50_ms": round(hot_p50 * 1000, 1),
            "within_2x_hot": within_hot,
            "exec_p50_held_ms": round(statistics.median(times) * 1000, 1) if times else None,
            "warden_samples": [  # (started, s after the first; took, ms)
                [round(at, 3), round(took * 1000, 1)]
                for at, took in zip(started, times, strict=True)
            ],
            "target": ">= 200",
            "pass": within >= 200,
        }
    ]


async def _create_until_refused(client: Any, limit: int) -> tuple[list[Any], str]:
    """Clones until ``limit``, or until admission refuses REFUSALS times in a row, RETRY_S
    apart (a new VM is charged its whole vCPU until it has been measured idle)."""
    held: list[Any] = []
    refusals = 0
    while len(held) < limit:
        try:
            held.append(await client.AsyncSandbox.create(template=TEMPLATE))
            refusals = 0
        except AdmissionError as exc:
            refusals += 1
            if refusals >= REFUSALS:
                return held, str(exc).splitlines()[0]
            await asyncio.sleep(RETRY_S)
    return held, ""


async def _idle_execs(sbx: AsyncSandbox, idle_s: float, runs: int) -> list[float]:
    """``runs`` execs of ``sbx``, each after ``idle_s`` idle: a held clone's conditions."""
    times = []
    for _ in range(runs):
        await asyncio.sleep(idle_s)
        times.append(await _exec_s(sbx))
    return times


async def _exec_s(sbx: AsyncSandbox) -> float:
    t0 = time.perf_counter()
    await sbx.commands.run(["true"])
    return time.perf_counter() - t0


async def _remove_all(d: Daemon, ids: list[str]) -> None:
    for vm_id in ids:
        with contextlib.suppress(httpx.HTTPError):
            await d.remove(vm_id)


def _row(name: str, w: list[float], p: list[float], peer_is: str) -> dict[str, Any]:
    wm, pm = statistics.median(w), statistics.median(p)
    return {
        "metric": name,
        "warden": round(wm, 4),
        "peer": round(pm, 4),
        "ratio": round(wm / pm, 3),
        "peer_is": peer_is,
        "warden_samples": [round(x, 4) for x in w],
        "peer_samples": [round(x, 4) for x in p],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    await _make_template()
    rows: list[dict[str, Any]] = []
    try:
        sections: dict[str, Callable[[], Awaitable[list[dict[str, Any]]]]] = {
            "pool": lambda: bench_pool(args.runs),
            "burst": lambda: bench_burst(args.burst),
            "pss": lambda: bench_pss(args.clones),
            "hold": lambda: bench_hold(args.hold, None),
            "hold-paused": lambda: bench_hold(args.hold, args.auto_pause),
        }
        for name, section in sections.items():
            if args.only in ("all", name):
                found = await section()
                for row in found:
                    print(json.dumps(row), flush=True)  # kept if a later section fails
                rows += found
    finally:
        Templates(Paths.from_env()).remove(TEMPLATE)
    return {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "results": rows}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--hold", type=int, default=200)
    parser.add_argument("--auto-pause", type=float, default=2.0)
    parser.add_argument(
        "--only", choices=("all", "pool", "burst", "pss", "hold", "hold-paused"), default="all"
    )
    args = parser.parse_args()
    report = asyncio.run(main(args))
    RESULTS.mkdir(exist_ok=True)
    stamp = report["when"].replace(":", "").replace("-", "")
    out = RESULTS / f"density-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["results"]:
        verdict = (
            f"  {row['target']} {'PASS' if row['pass'] else 'FAIL'}" if "target" in row else ""
        )
        print(f"{row['metric']:55} {row['warden']!s:>9} {row['peer']!s:>9} {row['ratio']!s:>7}"
              f"{verdict}")  # fmt: skip
    print(f"results: {out}")


if __name__ == "__main__":
    cli()
