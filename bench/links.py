"""Links, relayed path: stream throughput A -> B and the 64-byte round trip, on real VMs.

``python -m bench.links [--mib 64] [--trips 200]``: boots two sandboxes under the daemon's
Manager (in process), links them, and prints one JSON object:

- ``stream``: a client in A writes ``--mib`` MiB into the link as fast as it can; a client in B
  reads it all and times it from its first byte to EOF (MB/s = 10^6 bytes per second).
- ``both_ways``: the same, A -> B and B -> A at once (each direction's rate).
- ``round_trip``: A writes 64 bytes, B echoes them, A reads them back; p50/p90 over
  ``--trips`` trips after 20 warm-up ones.

Not in ``make bench``: it is the baseline of issue 10's table (the shared-memory ring must do
3x better on the stream and 0.3x on the round trip), run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from warden.config import Paths
from warden.server.manager import Manager
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec

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


async def _run(machine: Machine, script: str, *args: str) -> dict[str, Any]:
    result = await machine.agent.exec(["python3", "-c", script, *args], timeout=900)
    if result.exit_code != 0:
        raise RuntimeError(result.stderr.decode(errors="replace"))
    out = result.stdout.strip()
    answer: dict[str, Any] = json.loads(out) if out else {}
    return answer


def _rate(answer: dict[str, Any]) -> float:
    return round(float(answer["bytes"]) / float(answer["seconds"]) / 1e6, 1)


async def _stream(manager: Manager, a: Machine, b: Machine, size: int) -> dict[str, Any]:
    await manager.links.create(a.id, b.id, "stream")
    path = "/run/warden/links/stream.sock"
    got = (await asyncio.gather(_run(a, SEND, path, str(size)), _run(b, RECEIVE, path)))[1]
    return {"mib": size >> 20, "mb_per_s": _rate(got), "seconds": round(got["seconds"], 2)}


async def _both(manager: Manager, a: Machine, b: Machine, size: int) -> dict[str, Any]:
    await manager.links.create(a.id, b.id, "both")
    path = "/run/warden/links/both.sock"
    ra, rb = await asyncio.gather(_run(a, BOTH, path, str(size)), _run(b, BOTH, path, str(size)))
    return {"mib": size >> 20, "b_to_a_mb_per_s": _rate(ra), "a_to_b_mb_per_s": _rate(rb)}


async def _trips(manager: Manager, a: Machine, b: Machine, trips: int) -> dict[str, Any]:
    await manager.links.create(a.id, b.id, "ping")
    path = "/run/warden/links/ping.sock"
    answer = (await asyncio.gather(_run(a, PING, path, str(trips)), _run(b, ECHO, path)))[0]
    return {k: round(float(v), 2) for k, v in answer.items()} | {"trips": trips}


async def main(mib: int, trips: int) -> dict[str, Any]:
    manager = Manager(Paths.from_env())
    await manager.start()
    rows = []
    try:
        for _ in range(2):
            rows.append(await manager.create(VMSpec()))
        a = await manager.machine(rows[0].id)
        b = await manager.machine(rows[1].id)
        started = time.perf_counter()
        result: dict[str, Any] = {
            "path": "relay",
            "stream": await _stream(manager, a, b, mib << 20),
            "both_ways": await _both(manager, a, b, mib << 20),
            "round_trip": await _trips(manager, a, b, trips),
        }
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return result
    finally:
        await manager.links.close()
        for row in rows:
            await manager.remove(row.id, force=True)
        await manager.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--trips", type=int, default=200)
    args = parser.parse_args()
    found = asyncio.run(main(args.mib, args.trips))
    print(json.dumps(found, indent=2))
