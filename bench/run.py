"""``make bench``: warden against qemu-guest-agent in the same run, reported as ratios.

Both sides boot the same kernel, initramfs and rootfs under the same QEMU and accelerator;
only the agent differs. Runs alternate between the two so that machine noise hits both.
Results go to ``bench/results/<utc time>.json``; ``docs/benchmarks.md`` summarizes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.qga import QgaVM
from warden.jail import policy
from warden.sdk import AsyncSandbox

RESULTS = Path(__file__).resolve().parent / "results"
WRITE_SIZE = 64 * 1024 * 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def warden_cold(boot: str = "snapshot") -> float:
    t0 = time.perf_counter()
    sbx = await AsyncSandbox.create(boot=boot)
    try:
        r = await sbx.commands.run(["echo", "ready"])
        assert r.stdout == "ready\n"
        return time.perf_counter() - t0
    finally:
        await sbx.kill()


async def qga_cold() -> float:
    t0 = time.perf_counter()
    vm = QgaVM()
    try:
        await vm.start()
        code, out = await vm.exec("/bin/echo", ["ready"])
        assert out == b"ready\n" and code == 0
        return time.perf_counter() - t0
    finally:
        await vm.stop()


async def bench_cold(runs: int) -> list[dict[str, Any]]:
    """Create to first output. warden's default restores its boot snapshot (made by the
    warm-up create below if missing); the 'cold boot' row forces a boot from scratch."""
    await warden_cold()  # makes sure the boot snapshot of this configuration exists
    w: list[float] = []
    c: list[float] = []
    q: list[float] = []
    for _ in range(runs):
        w.append(await warden_cold())
        c.append(await warden_cold("cold"))
        q.append(await qga_cold())
    return [
        _pair("start: create to first output (s)", w, q, lower_is_better=True),
        _pair("  same, warden forced to cold boot (s)", c, q, lower_is_better=True),
    ]


@contextlib.contextmanager
def jail_mode(mode: policy.JailMode) -> Iterator[None]:
    old = policy.default_mode()
    policy.set_default_mode(mode)
    try:
        yield
    finally:
        policy.set_default_mode(old)


async def bench_jail(runs: int) -> list[dict[str, Any]]:
    """What the jail costs a create: create to first output with the jail (the default) and
    without it (``off``: QEMU as root, unjailed), alternating; each restores its own boot
    snapshot (their QEMU command lines differ), made by the warm-up creates."""
    for mode in ("on", "off"):
        with jail_mode(mode):
            await warden_cold()
    jailed: list[float] = []
    bare: list[float] = []
    for _ in range(runs):
        with jail_mode("on"):
            jailed.append(await warden_cold())
        with jail_mode("off"):
            bare.append(await warden_cold())
    row = _pair("jail: create to first output, on/off", jailed, bare, lower_is_better=True)
    row["peer_is"] = "the same warden without the jail (target ratio <= 1.2)"
    return [row]


async def bench_exec_and_write(iterations: int) -> list[dict[str, Any]]:
    data = os.urandom(WRITE_SIZE)
    digest = hashlib.sha256(data).hexdigest()
    sbx = await AsyncSandbox.create(memory_mib=512)
    vm = QgaVM(memory_mib=512)
    tuned = QgaVM(memory_mib=512, tuned=True)
    await vm.start()
    await tuned.start()
    try:
        for _ in range(5):  # warm up all three
            await sbx.commands.run(["true"])
            await vm.exec("/bin/true", [])
            await tuned.exec("/bin/true", [])
        w_exec: list[float] = []
        q_exec: list[float] = []
        t_exec: list[float] = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            await sbx.commands.run(["true"])
            w_exec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await vm.exec("/bin/true", [])
            q_exec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await tuned.exec("/bin/true", [])
            t_exec.append(time.perf_counter() - t0)
        await tuned.stop()

        t0 = time.perf_counter()
        await sbx.files.write("/tmp/big", data)
        w_write = time.perf_counter() - t0
        check = await sbx.commands.run(["sha256sum", "/tmp/big"], timeout=300)
        assert check.stdout.split()[0] == digest, "warden wrote different bytes"
        t0 = time.perf_counter()
        await vm.write_file("/tmp/big", data)
        q_write = time.perf_counter() - t0
        _, out = await vm.exec("/usr/bin/sha256sum", ["/tmp/big"])
        assert out.split()[0].decode() == digest, "qemu-ga wrote different bytes"
    finally:
        await sbx.kill()
        await vm.stop()
        await tuned.stop()
    mib = WRITE_SIZE / 1e6
    return [
        _pair("exec true p50 (ms)", [pct(w_exec, 0.5) * 1e3], [pct(q_exec, 0.5) * 1e3], True),
        _pair("exec true p95 (ms)", [pct(w_exec, 0.95) * 1e3], [pct(q_exec, 0.95) * 1e3], True),
        _pair(
            "  p50, peer given warden's kernel tuning",
            [pct(w_exec, 0.5) * 1e3],
            [pct(t_exec, 0.5) * 1e3],
            True,
        ),
        _pair("write 64 MiB host->guest (MB/s)", [mib / w_write], [mib / q_write], False),
    ]


def _pair(name: str, w: list[float], q: list[float], lower_is_better: bool) -> dict[str, Any]:
    wm, qm = statistics.median(w), statistics.median(q)
    return {
        "metric": name,
        "warden": round(wm, 3),
        "peer": round(qm, 3),
        "ratio": round(wm / qm, 3),
        "lower_is_better": lower_is_better,
        "warden_samples": [round(x, 4) for x in w],
        "peer_samples": [round(x, 4) for x in q],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    if args.only in ("all", "peer"):
        rows += await bench_cold(args.cold_runs)
        rows += await bench_exec_and_write(args.iterations)
    if args.only in ("all", "jail"):
        rows += await bench_jail(args.jail_runs)
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "peer": "qemu-guest-agent (Debian), same kernel/initramfs/rootfs, microvm, TCG, "
        "stock kernel command line (the 'tuning' row gives it warden's); the 'jail' row's "
        "peer is warden without the jail",
        "results": rows,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--jail-runs", type=int, default=10)
    parser.add_argument(
        "--only",
        choices=("all", "peer", "jail"),
        default="all",
        help="peer: warden against qemu-guest-agent; jail: warden with and without its jail",
    )
    args = parser.parse_args()
    report = asyncio.run(main(args))
    RESULTS.mkdir(exist_ok=True)
    stamp = report["when"].replace(":", "").replace("-", "")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'metric':36} {'warden':>10} {'peer':>10} {'ratio':>8}")
    for row in report["results"]:
        print(f"{row['metric']:36} {row['warden']:>10} {row['peer']:>10} {row['ratio']:>7}x")
    print(f"results: {out}")


if __name__ == "__main__":
    cli()
