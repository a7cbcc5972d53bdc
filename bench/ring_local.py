"""Links, shared-memory ring: two real guest agents on the host (no VM) over one region file.

``python -m bench.ring_local [--mib 256] [--trips 500]`` runs two agents (``python -m
warden.guest`` on socketpairs, as tests/unit/test_links_ring_local.py does), makes a region
file in /dev/shm with the link's header (as the daemon makes the memfd), opens the ring link's
two ends, and prints one JSON object:

- ``stream``: a client of end a writes ``--mib`` MiB, a client of end b reads it to EOF
  (MB/s = 10^6 bytes per second), sealed records; ``stream_plain``: the same, plaintext ring.
- ``both_ways``: ``--mib`` MiB each way at once (each direction's rate).
- ``round_trip``: 64 bytes a -> b, echoed back; p50/p90 (ms) over ``--trips`` after 50
  warm-up trips, and the same after 1.5 s idle each (the backoff's idle sleeps).
- ``idle_cpu``: the CPU share of one agent over 5 s with the link open and both clients
  connected but silent (the reader's polling).

No VM: this measures the agents' code (AEAD, copies, polling) on the host's CPU, not TCG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from warden.agent.client import AgentClient
from warden.agent.link import LinkEnd
from warden.wire.ops import Key
from warden.wire.ring import REGION_SIZE, pack_header

BLOCK = bytes(range(256)) * 4096


def ring_options(link_id: bytes, plain: bool) -> dict[str, object]:
    return {Key.TRANSPORT: "ring", Key.LINK_ID: link_id.hex(), Key.PLAIN: plain}


class Pair:
    """Two agents (a, b), their link directories, one directory of region files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.regions = root / "regions"
        self.regions.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: dict[str, AgentClient] = {}

    async def start(self) -> None:
        for name in ("a", "b"):
            parent, child = socket.socketpair()
            (self.root / name).mkdir()
            env = {**os.environ, "WARDEN_LINK_DIR": str(self.root / name)}
            env["WARDEN_LINK_REGIONS"] = str(self.regions)
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "warden.guest", "--fd", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
            child.close()
            reader, writer = await asyncio.open_connection(sock=parent, limit=1 << 20)
            self.clients[name] = await AgentClient.from_streams(reader, writer, timeout=10)

    async def link(self, name: str, plain: bool) -> tuple[LinkEnd, LinkEnd]:
        link_id, key = os.urandom(16), os.urandom(32)
        with open(self.regions / name, "wb") as f:
            f.write(pack_header(link_id))
            f.truncate(REGION_SIZE)
        ends = []
        for role in ("a", "b"):
            client = self.clients[role]
            ends.append(await client.open_link(name, key, role, ring_options(link_id, plain)))
        return ends[0], ends[1]

    def sock(self, role: str, name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.root / role / f"{name}.sock"))
        return s

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        for proc in self.procs.values():
            proc.wait(timeout=10)


def _send(s: socket.socket, size: int) -> None:
    view = memoryview(BLOCK)
    while size > 0:
        size -= s.send(view[: min(len(BLOCK), size)])
    s.shutdown(socket.SHUT_WR)


def _drain(s: socket.socket, out: dict[str, float]) -> None:
    buf = bytearray(1 << 20)
    got, start = 0, 0.0
    while n := s.recv_into(buf):
        if not got:
            start = time.perf_counter()
        got += n
    out["mbs"] = got / (time.perf_counter() - start) / 1e6


async def _finish(ends: tuple[LinkEnd, LinkEnd]) -> None:
    for end in ends:
        assert await end.receive() is None and end.ended is not None, end.ended
        await end.close()


async def stream(pair: Pair, name: str, mib: int, plain: bool, both: bool) -> list[float]:
    ends = await pair.link(name, plain)
    sa, sb = pair.sock("a", name), pair.sock("b", name)
    rates: list[dict[str, float]] = [{}, {}]
    threads = [
        threading.Thread(target=_send, args=(sa, mib << 20)),
        threading.Thread(target=_drain, args=(sb, rates[0])),
        threading.Thread(target=_drain, args=(sa, rates[1])),
    ]
    if both:
        threads.append(threading.Thread(target=_send, args=(sb, mib << 20)))
    for t in threads:
        t.start()
    if not both:
        await asyncio.to_thread(threads[1].join)
        sb.shutdown(socket.SHUT_WR)
    for t in threads:
        await asyncio.to_thread(t.join)
    await _finish(ends)
    sa.close()
    sb.close()
    return [round(r["mbs"], 1) for r in (rates if both else rates[:1])]


def _trips(sa: socket.socket, sb: socket.socket, n: int, pause: float) -> list[float]:
    message, times = b"x" * 64, []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        start = time.perf_counter()
        sa.sendall(message)
        got = b""
        while len(got) < 64:
            got += sb.recv(64 - len(got))
        sb.sendall(got)
        back = b""
        while len(back) < 64:
            back += sa.recv(64 - len(back))
        times.append((time.perf_counter() - start) * 1000)
    return times


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency_and_idle(pair: Pair, trips: int) -> dict[str, Any]:
    ends = await pair.link("rtt", plain=False)
    sa, sb = pair.sock("a", "rtt"), pair.sock("b", "rtt")
    _trips(sa, sb, 50, 0)
    hot = await asyncio.to_thread(_trips, sa, sb, trips, 0)
    cold = await asyncio.to_thread(_trips, sa, sb, 10, 1.5)
    await asyncio.sleep(2)  # idle: the backoff at its longest sleep
    pid = pair.procs["a"].pid
    before, start = _cpu_s(pid), time.monotonic()
    await asyncio.sleep(5)
    idle = (_cpu_s(pid) - before) / (time.monotonic() - start)
    sa.shutdown(socket.SHUT_WR)
    sb.shutdown(socket.SHUT_WR)
    await _finish(ends)
    sa.close()
    sb.close()

    def q(xs: list[float], p: float) -> float:
        return round(statistics.quantiles(xs, n=100)[int(p) - 1], 3)

    return {
        "round_trip_ms": {"p50": q(hot, 50), "p90": q(hot, 90)},
        "round_trip_after_idle_ms": {"p50": round(statistics.median(cold), 3)},
        "idle_cpu_percent": round(idle * 100, 2),
    }


async def main(mib: int, trips: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        pair = Pair(Path(tmp))
        await pair.start()
        try:
            result: dict[str, Any] = {"mib": mib}
            result["stream_mbs"] = (await stream(pair, "s", mib, False, False))[0]
            result["stream_plain_mbs"] = (await stream(pair, "p", mib, True, False))[0]
            result["both_ways_mbs"] = await stream(pair, "w", mib, False, True)
            result |= await latency_and_idle(pair, trips)
        finally:
            await pair.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--trips", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.mib, args.trips)), indent=2))
