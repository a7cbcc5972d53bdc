"""Links: stream throughput A -> B and the 64-byte round trip over each path, on real VMs.

``python -m bench.links [--mib 64] [--trips 200]`` (part of ``make bench``): boots two
sandboxes under the daemon's Manager (in process) and, over each path in turn -- the
encrypted shared-memory ring (warden's), the same ring with plaintext records (to show the
crypto's share), and the encrypted relay through the daemon (the baseline) -- measures:

- ``stream``: a client in A writes ``--mib`` MiB into the link as fast as it can; a client in B
  reads it all and times it from its first byte to EOF (MB/s = 10^6 bytes per second).
- ``both_ways``: the same, A -> B and B -> A at once (each direction's rate).
- ``round_trip``: A writes 64 bytes, B echoes them, A reads them back; p50/p90 over
  ``--trips`` trips after 20 warm-up ones.

``idle_link``: each VM's QEMU CPU with an open ring link whose clients are connected and
silent (measured 12-22 s and 65-75 s into the silence, at the backoff's quiet levels), against
the same VMs after the link is removed, and the first round trip after 78 s of silence.

Then the cost of link slots (``vmm/linkslots.py``): boots of a VM with its 4 empty slots and
without (cold and from its boot template, alternating), the PSS of each idle, and the time to
make a ring link, against the alternative of a VM created for each link. Issue 10's targets:
ring stream >= 3x the relay's, ring round trip p50 <= 0.3x the relay's. Results go to
``bench/results/links-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import time
from typing import Any

from bench.run import RESULTS
from warden._errors import LinkNotFoundError
from warden.config import Paths
from warden.links import Transport
from warden.policy.meter import pss_mib
from warden.server.manager import Manager
from warden.vmm.linkslots import Slots
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import Templates
from warden.vmm.usage import cpu_seconds

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
block = bytes(range(256)) * 1024
n = int(sys.argv[2])
view = memoryview(block)
while n > 0:
    n -= s.send(view[: min(len(block), n)])
s.shutdown(socket.SHUT_WR)
while s.recv(1 << 16):
    pass
"""
RECEIVE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.shutdown(socket.SHUT_WR)
buf = bytearray(1 << 18)
got = s.recv_into(buf)
start = time.perf_counter()
while True:
    n = s.recv_into(buf)
    if not n:
        break
    got += n
print(json.dumps({"bytes": got, "seconds": time.perf_counter() - start}))
"""
BOTH = r"""
import json, socket, sys, threading, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
n = int(sys.argv[2])
def send():
    block = memoryview(bytes(range(256)) * 1024)
    left = n
    while left > 0:
        left -= s.send(block[: min(len(block), left)])
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
buf = bytearray(1 << 18)
got = s.recv_into(buf)
start = time.perf_counter()
while True:
    k = s.recv_into(buf)
    if not k:
        break
    got += k
took = time.perf_counter() - start
t.join()
print(json.dumps({"bytes": got, "seconds": took}))
"""
PING = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
msg = b"x" * 64
times = []
for i in range(int(sys.argv[2]) + 20):
    t = time.perf_counter()
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    if i >= 20:
        times.append(time.perf_counter() - t)
s.shutdown(socket.SHUT_WR)
s.recv(1)
times.sort()
p50, p90 = times[len(times) // 2], times[len(times) * 9 // 10]
print(json.dumps({"p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3}))
"""
ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
while d := s.recv(1 << 16):
    s.sendall(d)
s.shutdown(socket.SHUT_WR)
"""

IDLE_PING = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
time.sleep(float(sys.argv[2]))
t = time.perf_counter()
s.sendall(b"x" * 64)
got = 0
while got < 64:
    got += len(s.recv(64 - got))
took = time.perf_counter() - t
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"first_round_trip_ms": took * 1e3}))
"""
IDLE_S = 78.0
"""How long the idle-link clients stay connected and silent (past the backoff's quiet levels,
``guest/ring.py:QUIET_SLEEPS``); both QEMUs' CPU is measured from 12 to 22 s and from 65 to
75 s."""


async def _run(machine: Machine, script: str, *args: str) -> dict[str, Any]:
    result = await machine.agent.exec(["python3", "-c", script, *args], timeout=900)
    if result.exit_code != 0:
        raise RuntimeError(result.stderr.decode(errors="replace"))
    out = result.stdout.strip()
    answer: dict[str, Any] = json.loads(out) if out else {}
    return answer


def _rate(answer: dict[str, Any]) -> float:
    return round(float(answer["bytes"]) / float(answer["seconds"]) / 1e6, 1)


Path = tuple[Transport, bool]
"""A link's path: its transport, and whether its records are plaintext (the benchmark's)."""
PATHS: dict[str, Path] = {
    "ring": ("ring", False),
    "ring_plain": ("ring", True),
    "relay": ("relay", False),
}


async def _link(manager: Manager, a: Machine, b: Machine, name: str, path: Path) -> str:
    await manager.links.create(a.id, b.id, name, transport=path[0], plain=path[1])
    return f"/run/warden/links/{name}.sock"


async def _stream(manager: Manager, a: Machine, b: Machine, size: int, p: Path) -> dict[str, Any]:
    path = await _link(manager, a, b, f"stream-{p[0]}{int(p[1])}", p)
    got = (await asyncio.gather(_run(a, SEND, path, str(size)), _run(b, RECEIVE, path)))[1]
    return {"mib": size >> 20, "mb_per_s": _rate(got), "seconds": round(got["seconds"], 2)}


async def _both(manager: Manager, a: Machine, b: Machine, size: int, p: Path) -> dict[str, Any]:
    path = await _link(manager, a, b, f"both-{p[0]}{int(p[1])}", p)
    ra, rb = await asyncio.gather(_run(a, BOTH, path, str(size)), _run(b, BOTH, path, str(size)))
    return {"mib": size >> 20, "b_to_a_mb_per_s": _rate(ra), "a_to_b_mb_per_s": _rate(rb)}


async def _trips(manager: Manager, a: Machine, b: Machine, trips: int, p: Path) -> dict[str, Any]:
    path = await _link(manager, a, b, f"ping-{p[0]}{int(p[1])}", p)
    answer = (await asyncio.gather(_run(a, PING, path, str(trips)), _run(b, ECHO, path)))[0]
    return {k: round(float(v), 2) for k, v in answer.items()} | {"trips": trips}


def _cpu_percent(machines: list[Machine], seconds: float) -> list[float]:
    """Each machine's QEMU CPU over ``seconds`` (blocking), in % of a host core."""
    before = [cpu_seconds(m._qemu_pid()) or 0.0 for m in machines]
    time.sleep(seconds)
    after = [cpu_seconds(m._qemu_pid()) or 0.0 for m in machines]
    return [round((y - x) / seconds * 100, 2) for x, y in zip(before, after, strict=True)]


async def _idle_link(manager: Manager, a: Machine, b: Machine) -> dict[str, Any]:
    """The CPU an open, silent ring link costs its two VMs (clients connected at both ends,
    idle past the backoff's dormant level), against the same VMs once it is removed, and the
    first round trip after that silence."""
    name = "idle"
    path = await _link(manager, a, b, name, PATHS["ring"])
    pinging = asyncio.gather(_run(a, IDLE_PING, path, str(IDLE_S)), _run(b, ECHO, path))
    await asyncio.sleep(12)
    quiet_10s = await asyncio.to_thread(_cpu_percent, [a, b], 10)
    await asyncio.sleep(43)
    quiet_60s = await asyncio.to_thread(_cpu_percent, [a, b], 10)
    answer = (await pinging)[0]
    with contextlib.suppress(LinkNotFoundError):  # gone with its stream's clean end
        await manager.links.remove(name)
    await asyncio.sleep(2)
    without = await asyncio.to_thread(_cpu_percent, [a, b], 10)
    return {
        "qemu_cpu_percent_with_link_12_to_22s": quiet_10s,
        "qemu_cpu_percent_with_link_65_to_75s": quiet_60s,
        "qemu_cpu_percent_without": without,
        "first_round_trip_after_idle_ms": round(float(answer["first_round_trip_ms"]), 2),
        "idle_s": IDLE_S,
    }


async def _create_times(manager: Manager, a: Machine, b: Machine, n: int) -> dict[str, Any]:
    """Seconds to make a ring link (plug both regions, both agents open) and to remove it."""
    made, removed = [], []
    for i in range(n):
        start = time.perf_counter()
        await manager.links.create(a.id, b.id, f"make-{i}")
        made.append(time.perf_counter() - start)
        _, took = await manager.links.remove(f"make-{i}")
        removed.append(took)
        await asyncio.sleep(0.2)  # the unplug finishes in the background
    return {
        "create_p50_ms": round(statistics.median(made) * 1e3, 1),
        "rm_p50_ms": round(statistics.median(removed) * 1e3, 1),
        "runs": n,
    }


async def _paths(mib: int, trips: int) -> dict[str, Any]:
    manager = Manager(Paths.from_env())
    await manager.start()
    rows = []
    try:
        for _ in range(2):
            rows.append(await manager.create(VMSpec()))
        a = await manager.machine(rows[0].id)
        b = await manager.machine(rows[1].id)
        result: dict[str, Any] = {"create": await _create_times(manager, a, b, 5)}
        result["idle_link"] = await _idle_link(manager, a, b)
        for key, path in PATHS.items():
            result[key] = {
                "stream": await _stream(manager, a, b, mib << 20, path),
                "both_ways": await _both(manager, a, b, mib << 20, path),
                "round_trip": await _trips(manager, a, b, trips, path),
            }
        return result
    finally:
        await manager.links.close()
        for row in rows:
            await manager.remove(row.id, force=True)
        await manager.close()


SLOT_TEMPLATE = "bench-slots-{}"


async def _boot(slots: int, boot: str) -> tuple[float, float | None]:
    """Seconds to launch a VM with ``slots`` link slots (cold, or a clone of this shape's
    template), and its PSS (MiB) after 3 s idle."""
    template = SLOT_TEMPLATE.format(slots) if boot == "template" else None
    machine = Machine(VMSpec(boot="cold", template=template))
    machine.link_slots = Slots(slots)
    start = time.perf_counter()
    await machine.launch()
    took = time.perf_counter() - start
    try:
        await machine.agent.exec(["true"])
        await asyncio.sleep(3)
        return took, pss_mib(machine._qemu_pid())
    finally:
        await machine.kill()


async def _slot_cost(runs: int) -> dict[str, Any]:
    """Boots with and without link slots, alternating: cold, and clones of a template of each
    shape (made first from a cold boot of that shape, removed at the end)."""
    templates = Templates(Paths.from_env())
    for slots in (0, 4):
        machine = Machine(VMSpec(boot="cold"))
        machine.link_slots = Slots(slots)
        await machine.launch()
        try:
            await machine.save_template(SLOT_TEMPLATE.format(slots), keep_running=False)
        finally:
            await machine.kill()
    found: dict[str, list[tuple[float, float | None]]] = {}
    try:
        for _ in range(runs):
            for slots in (0, 4):
                for boot in ("cold", "template"):
                    found.setdefault(f"{boot}_{slots}", []).append(await _boot(slots, boot))
    finally:
        for slots in (0, 4):
            templates.remove(SLOT_TEMPLATE.format(slots))
    out: dict[str, Any] = {"runs": runs}
    for key, values in found.items():
        out[f"{key}_p50_s"] = round(statistics.median(v[0] for v in values), 3)
        pss = [v[1] for v in values if v[1] is not None]
        out[f"{key}_pss_mib"] = round(statistics.median(pss), 1) if pss else None
    return out


def _ratios(found: dict[str, Any]) -> dict[str, Any]:
    ring, plain, relay = found["ring"], found["ring_plain"], found["relay"]
    stream = ring["stream"]["mb_per_s"] / relay["stream"]["mb_per_s"]
    trip = ring["round_trip"]["p50_ms"] / relay["round_trip"]["p50_ms"]
    return {
        "stream_ring_over_relay": round(stream, 2),
        "stream_target_3x": "PASS" if stream >= 3 else "FAIL",
        "round_trip_ring_over_relay": round(trip, 3),
        "round_trip_target_0.3x": "PASS" if trip <= 0.3 else "FAIL",
        "stream_plain_over_ring": round(
            plain["stream"]["mb_per_s"] / ring["stream"]["mb_per_s"], 2
        ),
    }


async def main(mib: int, trips: int, slot_runs: int) -> dict[str, Any]:
    started = time.perf_counter()
    found = await _paths(mib, trips)
    found["ratios"] = _ratios(found)
    if slot_runs:
        found["slots"] = await _slot_cost(slot_runs)
    found["wall_s"] = round(time.perf_counter() - started, 1)
    found["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--trips", type=int, default=200)
    parser.add_argument("--slot-runs", type=int, default=3, help="0 skips the slot cost")
    args = parser.parse_args()
    report = asyncio.run(main(args.mib, args.trips, args.slot_runs))
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%z")
    out = RESULTS / f"links-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"results: {out}")
