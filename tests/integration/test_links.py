"""Links between two real VMs under TCG, made by an in-process Manager (the daemon's).

Each test boots two sandboxes, links them, and runs a Python client in each guest that talks
through ``/run/warden/links/NAME.sock``. The stream, end-of-stream, removal and death tests run
over both transports: the shared-memory ring and the relay through the daemon. What only the
ring has (its region, its slots) is tests/integration/test_links_ring.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from warden._errors import (
    LinkError,
    LinkNotFoundError,
    SpecError,
    StateTransitionError,
    VMNotFoundError,
)
from warden.config import Paths
from warden.links import TRANSPORTS, Transport
from warden.server.manager import Manager
from warden.store.db import DAEMON_OWNER
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec

pytestmark = pytest.mark.vm

# A guest client: sends N bytes (a pattern from SEED) and shuts its side down, while it reads
# all the other end sends; prints the digests and counts as JSON.
CLIENT = r"""
import hashlib, json, socket, sys, threading, time
path, n, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(200):
    try:
        s.connect(path)
        break
    except OSError:
        time.sleep(0.05)
out = {}
def send():
    block = hashlib.sha256(seed).digest() * 8192
    h, sent = hashlib.sha256(), 0
    try:
        while sent < n:
            chunk = block[: min(len(block), n - sent)]
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
    except OSError as exc:
        out["send_error"] = exc.errno
    out["sent"], out["sent_n"] = h.hexdigest(), sent
t = threading.Thread(target=send)
t.start()
h, got = hashlib.sha256(), 0
try:
    while True:
        d = s.recv(1 << 18)
        if not d:
            break
        h.update(d)
        got += len(d)
except OSError as exc:
    out["recv_error"] = exc.errno
t.join()
out["got"], out["got_n"] = h.hexdigest(), got
print(json.dumps(out))
"""


def pattern_digest(n: int, seed: str) -> str:
    block = hashlib.sha256(seed.encode()).digest() * 8192
    h, sent = hashlib.sha256(), 0
    while sent < n:
        chunk = block[: min(len(block), n - sent)]
        h.update(chunk)
        sent += len(chunk)
    return h.hexdigest()


@dataclass
class Pair:
    manager: Manager
    a: Machine
    b: Machine


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    value: Transport = request.param
    return value


@contextlib.asynccontextmanager
async def sandboxes(owners: tuple[str, ...]) -> AsyncIterator[tuple[Manager, list[Machine]]]:
    """A Manager of the shared home with a running sandbox of each of these owners."""
    manager = Manager(Paths.from_env())
    await manager.start()
    rows = []
    try:
        for owner in owners:
            rows.append(await manager.create(VMSpec(), owner=owner))
        yield manager, [await manager.machine(row.id) for row in rows]
    finally:
        await manager.links.close()
        for row in rows:
            await manager.remove(row.id, force=True)
        await manager.close()


@contextlib.asynccontextmanager
async def two_sandboxes(
    owners: tuple[str, str] = (DAEMON_OWNER, DAEMON_OWNER),
) -> AsyncIterator[Pair]:
    """A Manager of the shared home with two running sandboxes, of these owners."""
    async with sandboxes(owners) as (manager, (a, b)):
        yield Pair(manager, a, b)


@pytest.fixture
async def pair(no_leaks: None) -> AsyncIterator[Pair]:
    async with two_sandboxes() as p:
        yield p


async def client(machine: Machine, name: str, n: int, seed: str) -> dict[str, object]:
    argv = ["python3", "-c", CLIENT, f"/run/warden/links/{name}.sock", str(n), seed]
    result = await machine.agent.exec(argv, timeout=300)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


STREAM_MIB = {"ring": 256, "relay": int(os.environ.get("WARDEN_TEST_LINK_MIB", "128"))}
"""Issue 10 asks for 256 MiB each way, which the ring carries in full. Under TCG on this shared
2-core host the relay carries about 3-4 MB/s each way when both run at once (bench/links.py),
so 256 MiB takes 70-90 s; 128 MiB (~40 s) is the largest that fits a minute here for the relay.
WARDEN_TEST_LINK_MIB=256 runs it all."""


async def test_a_stream_both_ways_at_once_arrives_intact(pair: Pair, transport: Transport) -> None:
    n = STREAM_MIB[transport] << 20
    await pair.manager.links.create(pair.a.id, pair.b.id, "t", transport=transport)
    start = time.perf_counter()
    ra, rb = await asyncio.gather(client(pair.a, "t", n, "A"), client(pair.b, "t", n, "B"))
    took = time.perf_counter() - start
    print(f"{n >> 20} MiB each way at once in {took:.1f}s")
    assert ra["got"] == pattern_digest(n, "B") and rb["got"] == pattern_digest(n, "A")
    assert ra["got_n"] == rb["got_n"] == n
    assert "recv_error" not in ra and "send_error" not in rb
    for _ in range(100):  # both directions ended: the link is gone
        if not pair.manager.links.list():
            break
        await asyncio.sleep(0.05)
    assert pair.manager.links.list() == []


async def test_eof_on_one_side_is_eof_on_the_other(pair: Pair, transport: Transport) -> None:
    await pair.manager.links.create(pair.a.id, pair.b.id, "eof", transport=transport)
    ra, rb = await asyncio.gather(client(pair.a, "eof", 0, "A"), client(pair.b, "eof", 5000, "B"))
    assert rb["got_n"] == 0 and rb["got"] == hashlib.sha256().hexdigest()
    assert ra["got_n"] == 5000 and ra["got"] == pattern_digest(5000, "B")


HOLD = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b"hello")
print("connected", flush=True)
d = s.recv(100)
t = time.monotonic()
try:
    while d:
        d = s.recv(100)
    for _ in range(50):
        s.sendall(b"x" * 65536)
    print("no-error")
except OSError as exc:
    print("error", errno.errorcode.get(exc.errno, exc.errno))
"""


def ended_in_error(out: str) -> bool:
    """Whether a client's output says its link ended in an error, not a normal end of stream.

    A link that ends in an error shuts its socket down both ways (:mod:`warden.guest.link`):
    the client's writes fail with EPIPE, or, when it had sent bytes the agent had not read
    yet, the kernel reports the close as ECONNRESET (both were seen in CI).
    """
    return "error EPIPE" in out or "error ECONNRESET" in out


async def hold(machine: Machine, name: str) -> str:
    """The client's output; if it did not exit 0, its exit status and stderr after it (a
    failure then shows how the client ended)."""
    argv = ["python3", "-c", HOLD, f"/run/warden/links/{name}.sock"]
    result = await machine.agent.exec(argv, timeout=120)
    out = result.stdout.decode()
    if result.exit_code != 0:
        out += f"[exit {result.exit_code}, signal {result.signal}] {result.stderr.decode()}"
    return out


async def wait_for_socket(machine: Machine, name: str, present: bool = True) -> None:
    for _ in range(200):
        result = await machine.agent.exec(["test", "-S", f"/run/warden/links/{name}.sock"])
        if (result.exit_code == 0) == present:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the socket of {name} is {'absent' if present else 'still there'}")


async def test_rm_stops_the_link_within_100ms_and_both_ends_see_an_error(
    pair: Pair, transport: Transport
) -> None:
    # A first link and rm warm the path up: under TCG, the first run of any guest code pays
    # for its translation (FIELD-NOTES: 0.3-1.1 s for a fresh QEMU's first exec).
    await pair.manager.links.create(pair.a.id, pair.b.id, "warm", transport=transport)
    await pair.manager.links.remove("warm")
    await pair.manager.links.create(pair.a.id, pair.b.id, "rm", transport=transport)
    ha = asyncio.create_task(hold(pair.a, "rm"))
    hb = asyncio.create_task(hold(pair.b, "rm"))
    await wait_for_socket(pair.a, "rm", present=False)  # each client took its end
    await wait_for_socket(pair.b, "rm", present=False)
    await asyncio.sleep(1.0)  # and got the other's hello
    _, took = await pair.manager.links.remove("rm")
    print(f"link rm: both ends closed in {took * 1000:.1f} ms")
    assert took < 0.1
    out_a, out_b = await ha, await hb
    assert "connected" in out_a and ended_in_error(out_a), out_a
    assert "connected" in out_b and ended_in_error(out_b), out_b
    with pytest.raises(LinkNotFoundError):
        await pair.manager.links.remove("rm")


async def test_a_vm_that_dies_gives_the_other_end_an_error(
    pair: Pair, transport: Transport
) -> None:
    await pair.manager.links.create(pair.a.id, pair.b.id, "die", transport=transport)
    hb = asyncio.create_task(hold(pair.b, "die"))
    await wait_for_socket(pair.b, "die", present=False)  # the client took the link
    await pair.manager.stop(pair.a.id, force=True)
    out_b = await asyncio.wait_for(hb, 60)
    assert ended_in_error(out_b), out_b
    for _ in range(100):
        if not pair.manager.links.list():
            break
        await asyncio.sleep(0.05)
    assert pair.manager.links.list() == []


async def test_bad_input_is_refused_and_leaves_nothing_open(pair: Pair) -> None:
    links = pair.manager.links
    with pytest.raises(LinkError, match="two different sandboxes"):
        await links.create(pair.a.id, pair.a.id, "self")
    with pytest.raises(VMNotFoundError):
        await links.create(pair.a.id, "no-such-vm", "missing")
    with pytest.raises(SpecError):
        await links.create(pair.a.id, pair.b.id, "Bad/Name")
    await links.create(pair.a.id, pair.b.id, "dup")
    with pytest.raises(LinkError, match="exists"):
        await links.create(pair.a.id, pair.b.id, "dup")
    assert [i.name for i in links.list()] == ["dup"]
    await links.remove("dup")
    await wait_for_socket(pair.a, "dup", present=False)
    await wait_for_socket(pair.b, "dup", present=False)
    # The end that opened is closed again when the other refuses (its agent has the name).
    held = await pair.b.agent.open_link("taken", bytes(32), "b")
    with pytest.raises(LinkError, match="could not open"):
        await links.create(pair.a.id, pair.b.id, "taken")
    await wait_for_socket(pair.a, "taken", present=False)
    await held.close()
    await wait_for_socket(pair.b, "taken", present=False)
    assert links.list() == []
    await pair.manager.stop(pair.b.id)
    with pytest.raises(StateTransitionError):
        await links.create(pair.a.id, pair.b.id, "stopped")
    result = await pair.a.agent.exec(["ls", "-A", "/run/warden/links"])
    assert b".sock" not in result.stdout, result.stdout  # only the NAME.error notes


async def test_an_open_link_holds_off_pause_and_template_saying_so(
    pair: Pair, transport: Transport
) -> None:
    """A pause or a template save of either end of an open link is refused, and the message
    names links and how to close one: a ring's device in place (``vmm/linkslots.py``), or a
    relayed link's request in flight on each end (the idle gate, which named only commands
    and file transfers before)."""
    await pair.manager.links.create(pair.a.id, pair.b.id, "busy", transport=transport)
    why = "link devices in place" if transport == "ring" else "open link"
    with pytest.raises(StateTransitionError, match=f"{why}.*link rm"):
        await pair.manager.pause(pair.a.id)
    with pytest.raises(StateTransitionError, match=f"{why}.*link rm"):
        await pair.manager.save_template(pair.b.id, "never-saved")
    assert not pair.manager.templates.exists("never-saved")
    await pair.manager.links.remove("busy")
    if transport == "relay":  # a ring's slot is released by the guest, in its own time
        assert (await pair.manager.pause(pair.a.id)).state.value == "paused"  # now it may
