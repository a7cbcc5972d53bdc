"""Issues 3 and 6: what the manager daemon adds, measured against embedded mode.

* exec of ``true`` with the SDK, on a sandbox of the daemon (its REST API, a binary record
  stream over its unix socket) against an embedded one, alternating, in one run: the daemon's
  added latency as a ratio at p50 (target at most 1.3x);
* exec stdout throughput of ``head -c 256M /dev/zero``, daemon and embedded, alternating
  (target at least 50 MB/s);
* the daemon's peak RSS above idle while one guest streams 1 GiB to a slow client (one that
  takes at most ``SLOW_CLIENT_MBPS``; target at most 64 MiB);
* list and inspect latency with 20 live VMs of 128 MiB each;
* issue 8: a 64 MiB file written into and read out of a sandbox of the daemon (its files
  routes) and an embedded one, alternating (``--only files`` runs this alone).

Run with ``python -m bench.daemon``; results go to ``bench/results/daemon-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import warden
from bench.run import RESULTS, pct
from warden.sdk import AsyncSandbox

WARDEN = str(Path(sys.executable).parent / "warden")
LIVE_VMS = 20


class Daemon:
    """A `warden serve` subprocess on a socket of its own, stopped by its pid."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="warden-bench-"))
        self.socket = self.dir / "warden.sock"
        self.proc = subprocess.Popen(
            [WARDEN, "serve", "--socket", str(self.socket), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("warden serve did not start")
            time.sleep(0.05)
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
            base_url="http://warden",
            timeout=120,
        )

    async def create(self, memory_mib: int) -> str:
        r = await self.client.post("/v1/sandboxes", json={"memory_mib": memory_mib})
        r.raise_for_status()
        return str(r.json()["id"])

    async def remove(self, vm_id: str) -> None:
        await self.client.delete(f"/v1/sandboxes/{vm_id}", params={"force": "true"})

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


async def bench_exec(daemon: Daemon, iterations: int) -> dict[str, Any]:
    """The same SDK call, ``sbx.commands.run(["true"])``, on a sandbox of the daemon and on an
    embedded one, alternating: what a user sees the daemon add."""
    remote = await warden.connect(f"unix://{daemon.socket}").AsyncSandbox.create(memory_mib=256)
    sbx = await AsyncSandbox.create(memory_mib=256)
    try:
        for _ in range(5):
            await remote.commands.run(["true"])
            await sbx.commands.run(["true"])
        via_daemon: list[float] = []
        embedded: list[float] = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            r = await remote.commands.run(["true"])
            via_daemon.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            e = await sbx.commands.run(["true"])
            embedded.append(time.perf_counter() - t0)
            if (r.exit_code, e.exit_code) != (0, 0):
                raise RuntimeError(f"exec of true failed: {r!r}, {e!r}")
    finally:
        await sbx.kill()
        await remote.kill()
    d50, e50 = pct(via_daemon, 0.5) * 1e3, pct(embedded, 0.5) * 1e3
    return {
        "metric": "exec true p50 (ms), daemon vs embedded",
        "daemon": round(d50, 3),
        "embedded": round(e50, 3),
        "ratio": round(d50 / e50, 3),
        "daemon_p95": round(pct(via_daemon, 0.95) * 1e3, 3),
        "embedded_p95": round(pct(embedded, 0.95) * 1e3, 3),
    }


THROUGHPUT_MIB = 256
SLOW_CLIENT_MBPS = 12.0
FLOOD_MIB = 1024


async def _stream_mbps(sbx: AsyncSandbox) -> float:
    """MB/s of ``head -c 256M /dev/zero`` into a callback that only counts (nothing kept)."""
    got = 0

    def count(chunk: bytes) -> None:
        nonlocal got
        got += len(chunk)

    t0 = time.perf_counter()
    r = await sbx._agent().exec(
        f"head -c {THROUGHPUT_MIB}M /dev/zero", on_stdout=count, max_output=0, timeout=600
    )
    elapsed = time.perf_counter() - t0
    if r.exit_code != 0 or got != THROUGHPUT_MIB << 20:
        raise RuntimeError(f"the stream ended early: {got} bytes, {r!r}")
    return got / elapsed / 1e6


async def bench_stdout_throughput(daemon: Daemon, runs: int) -> dict[str, Any]:
    """``head -c 256M /dev/zero`` through the daemon and embedded, alternating."""
    remote = await warden.connect(f"unix://{daemon.socket}").AsyncSandbox.create(memory_mib=256)
    sbx = await AsyncSandbox.create(memory_mib=256)
    via_daemon: list[float] = []
    embedded: list[float] = []
    try:
        for _ in range(runs):
            via_daemon.append(await _stream_mbps(remote))
            embedded.append(await _stream_mbps(sbx))
    finally:
        await sbx.kill()
        await remote.kill()
    return {
        "metric": f"exec stdout throughput, head -c {THROUGHPUT_MIB}M /dev/zero (MB/s)",
        "daemon": round(statistics.median(via_daemon), 1),
        "embedded": round(statistics.median(embedded), 1),
        "daemon_runs": [round(v, 1) for v in via_daemon],
        "embedded_runs": [round(v, 1) for v in embedded],
        "target": ">= 50",
    }


FILE_MIB = 64


async def _file_mbps(sbx: AsyncSandbox, data: bytes, digest: str) -> tuple[float, float]:
    """MB/s of a write of ``data`` into the sandbox, then of a read of it back."""
    t0 = time.perf_counter()
    await sbx.files.write("/tmp/big", data)
    write = len(data) / 1e6 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = await sbx.files.read("/tmp/big", format="bytes", max_size=None)
    read = len(data) / 1e6 / (time.perf_counter() - t0)
    if hashlib.sha256(got).hexdigest() != digest:
        raise RuntimeError("the file came back different")
    return write, read


async def bench_files(daemon: Daemon, runs: int) -> list[dict[str, Any]]:
    """A 64 MiB write and read through the daemon and embedded, alternating."""
    data = os.urandom(FILE_MIB << 20)
    digest = hashlib.sha256(data).hexdigest()
    remote = await warden.connect(f"unix://{daemon.socket}").AsyncSandbox.create(memory_mib=512)
    sbx = await AsyncSandbox.create(memory_mib=512)
    results: dict[str, list[float]] = {"dw": [], "dr": [], "ew": [], "er": []}
    try:
        for _ in range(runs):
            for key, box in (("d", remote), ("e", sbx)):
                write, read = await _file_mbps(box, data, digest)
                results[key + "w"].append(write)
                results[key + "r"].append(read)
    finally:
        await sbx.kill()
        await remote.kill()
    rows = []
    for op, name in (("w", "write host->guest"), ("r", "read guest->host")):
        d, e = statistics.median(results["d" + op]), statistics.median(results["e" + op])
        rows.append(
            {
                "metric": f"{FILE_MIB} MiB {name} (MB/s), daemon vs embedded",
                "daemon": round(d, 1),
                "embedded": round(e, 1),
                "ratio": round(d / e, 3),
                "daemon_runs": [round(v, 1) for v in results["d" + op]],
                "embedded_runs": [round(v, 1) for v in results["e" + op]],
            }
        )
    return rows


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def bench_slow_client_rss(daemon: Daemon) -> dict[str, Any]:
    """The daemon's RSS, sampled every 50 ms, while a guest streams 1 GiB to a client that
    reads at most SLOW_CLIENT_MBPS: what the guest cannot send yet must wait in the guest."""
    remote = await warden.connect(f"unix://{daemon.socket}").AsyncSandbox.create(memory_mib=256)
    pid = daemon.proc.pid
    got = 0
    t0 = time.perf_counter()

    async def slow(chunk: bytes) -> None:
        nonlocal got
        got += len(chunk)
        ahead = got / (SLOW_CLIENT_MBPS * 1e6) - (time.perf_counter() - t0)
        if ahead > 0:
            await asyncio.sleep(ahead)

    try:
        for _ in range(3):
            await remote.commands.run("true")
        idle = peak = _rss(pid)
        t0 = time.perf_counter()
        run = asyncio.create_task(
            remote._agent().exec(
                f"head -c {FLOOD_MIB}M /dev/zero", on_stdout=slow, max_output=0, timeout=3600
            )
        )
        while not run.done():
            peak = max(peak, _rss(pid))
            await asyncio.sleep(0.05)
        result = await run
        elapsed = time.perf_counter() - t0
    finally:
        await remote.kill()
    if result.exit_code != 0 or got != FLOOD_MIB << 20:
        raise RuntimeError(f"the stream ended early: {got} bytes, {result!r}")
    return {
        "metric": f"daemon RSS while a guest streams {FLOOD_MIB} MiB to a client reading "
        f"{SLOW_CLIENT_MBPS:g} MB/s (MiB)",
        "idle_rss": round(idle / 2**20, 1),
        "peak_rss": round(peak / 2**20, 1),
        "peak_above_idle": round((peak - idle) / 2**20, 1),
        "client_mbps": round(got / elapsed / 1e6, 1),
        "target": "<= 64 above idle",
    }


async def bench_list_inspect(daemon: Daemon, iterations: int) -> dict[str, Any]:
    ids = [await daemon.create(128) for _ in range(LIVE_VMS)]
    try:
        lists: list[float] = []
        inspects: list[float] = []
        for i in range(iterations):
            t0 = time.perf_counter()
            r = await daemon.client.get("/v1/sandboxes")
            lists.append(time.perf_counter() - t0)
            assert len(r.json()) >= LIVE_VMS
            t0 = time.perf_counter()
            r = await daemon.client.get(f"/v1/sandboxes/{ids[i % LIVE_VMS]}")
            inspects.append(time.perf_counter() - t0)
            r.raise_for_status()
    finally:
        for vm_id in ids:
            await daemon.remove(vm_id)
    return {
        "metric": f"API latency with {LIVE_VMS} live VMs of 128 MiB (ms)",
        "list_p50": round(statistics.median(lists) * 1e3, 3),
        "list_p95": round(pct(lists, 0.95) * 1e3, 3),
        "inspect_p50": round(statistics.median(inspects) * 1e3, 3),
        "inspect_p95": round(pct(inspects, 0.95) * 1e3, 3),
    }


async def main(only: str) -> dict[str, Any]:
    # 20 one-vCPU VMs on a 2-CPU host need a vCPU overcommit above the default 4.
    daemon = Daemon("--vcpu-overcommit", "16", "--log-level", "warning")
    try:
        rows = []
        if only == "all":
            rows += [
                await bench_exec(daemon, 200),
                await bench_stdout_throughput(daemon, 3),
                await bench_slow_client_rss(daemon),
                await bench_list_inspect(daemon, 200),
            ]
        rows += await bench_files(daemon, 3)
    finally:
        await daemon.close()
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count()},
        "results": rows,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=("all", "files"), default="all")
    report = asyncio.run(main(parser.parse_args().only))
    RESULTS.mkdir(exist_ok=True)
    stamp = report["when"].replace(":", "").replace("-", "")
    out = RESULTS / f"daemon-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["results"]:
        print(json.dumps(row))
    print(f"results: {out}")


if __name__ == "__main__":
    cli()
