"""Links between two real guest agents run on the host (no VM), relayed by a LinkManager.

Each agent is a subprocess on a socketpair, like tests/unit/test_agent_local.py, with its own
link directory (``WARDEN_LINK_DIR``). Fast checks of the stream, its bounds and its errors; the
VM tests (tests/integration/test_links.py) do the same through real guests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from warden._errors import AgentError, LinkError, VMNotFoundError
from warden.agent.client import AgentClient
from warden.links import LinkManager
from warden.server.audit import Auditor
from warden.wire.frame import INITIAL_WINDOW, Channel

AGENT = [sys.executable, "-m", "warden.guest"]


@dataclass
class FakeMachine:
    id: str
    agent: AgentClient
    links: Path


class Machines:
    """What LinkManager needs of the Manager: running machines by id, and an auditor."""

    def __init__(self) -> None:
        self.audit = Auditor()
        self.by_id: dict[str, FakeMachine] = {}

    async def machine(self, id_or_name: str) -> FakeMachine:
        if id_or_name not in self.by_id:
            raise VMNotFoundError(f"no VM has id or name {id_or_name!r}")
        return self.by_id[id_or_name]


@pytest.fixture
async def machines(tmp_path: Path) -> AsyncIterator[Machines]:
    found = Machines()
    procs = []
    try:
        for name in ("a", "b"):
            parent, child = socket.socketpair()
            links = tmp_path / name
            links.mkdir()
            proc = subprocess.Popen(
                [*AGENT, "--fd", str(child.fileno()), "--user-home", str(tmp_path)],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115 - the child has it
                env={**os.environ, "WARDEN_LINK_DIR": str(links)},
            )
            child.close()
            procs.append((proc, parent))
            reader, writer = await asyncio.open_connection(sock=parent, limit=1 << 20)
            client = await AgentClient.from_streams(reader, writer, timeout=10)
            found.by_id[name] = FakeMachine(name, client, links)
        yield found
    finally:
        for m in found.by_id.values():
            await m.agent.close()
        for proc, parent in procs:
            parent.close()
            assert proc.wait(timeout=10) == 0
        for name in ("a", "b"):
            log = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "Traceback" not in log, log


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(100):
        if path.exists():
            return await asyncio.open_unix_connection(str(path))
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


async def gone(path: Path) -> None:
    for _ in range(100):
        if not path.exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} is still there")


async def test_bytes_flow_both_ways_and_eof_ends_the_link(machines: Machines) -> None:
    links = LinkManager(machines)  # type: ignore[arg-type]
    a, b = machines.by_id["a"], machines.by_id["b"]
    await links.create("a", "b", "t", transport="relay")
    assert (a.links / "t.sock").stat().st_mode & 0o777 == 0o666
    ra, wa = await connect(a.links / "t.sock")
    rb, wb = await connect(b.links / "t.sock")
    await gone(a.links / "t.sock")  # one connection per link: the path goes once taken
    payload = os.urandom(3 << 20)  # more than every buffer on the way: backpressure holds it

    async def send() -> None:
        wa.write(payload)
        await wa.drain()
        wa.write_eof()

    wb.write(b"pong")
    _, got = await asyncio.gather(send(), rb.readexactly(len(payload)))
    assert got == payload
    assert await ra.readexactly(4) == b"pong"
    assert await rb.read() == b""  # a's EOF
    wb.write_eof()
    assert await ra.read() == b""
    for _ in range(100):
        if not links.list():
            break
        await asyncio.sleep(0.02)
    assert links.list() == []
    assert not (a.links / "t.error").exists() and not (b.links / "t.error").exists()
    wa.close()
    wb.close()


async def test_bad_input_leaves_nothing_open(machines: Machines) -> None:
    links = LinkManager(machines)  # type: ignore[arg-type]
    with pytest.raises(LinkError, match="two different"):
        await links.create("a", "a", "x")
    with pytest.raises(VMNotFoundError):
        await links.create("a", "nope", "x")
    end = await machines.by_id["b"].agent.open_link("busy", bytes(32), "b")
    with pytest.raises(LinkError, match="already open"):
        await links.create("a", "b", "busy", transport="relay")
    assert not (machines.by_id["a"].links / "busy.sock").exists()  # a's end closed again
    await end.close()
    with pytest.raises(AgentError, match="32 bytes"):
        await machines.by_id["a"].agent.open_link("k", bytes(31), "a")
    assert links.list() == []


async def test_rm_closes_both_ends_and_says_why(machines: Machines) -> None:
    links = LinkManager(machines)  # type: ignore[arg-type]
    a, b = machines.by_id["a"], machines.by_id["b"]
    await links.create("a", "b", "rm", transport="relay")
    ra, wa = await connect(a.links / "rm.sock")
    rb, wb = await connect(b.links / "rm.sock")
    await asyncio.sleep(0.2)  # both accepted (else a client still queued sees ECONNRESET)
    _, took = await links.remove("rm")
    assert took < 0.1
    assert await ra.read() == b"" and await rb.read() == b""
    for m in (a, b):
        assert (m.links / "rm.error").read_text().strip() == "the link was removed"
    wa.close()
    wb.close()


async def test_a_host_sending_beyond_the_agents_credit_closes_the_link(
    machines: Machines,
) -> None:
    """The agent holds at most what it granted: the relay cannot make it buffer more."""
    b = machines.by_id["b"]
    end = await b.agent.open_link("flood", bytes(32), "b")
    request = end._request  # the test plays a hostile relay
    assert request.send_credit == INITIAL_WINDOW
    for _ in range(INITIAL_WINDOW // (64 << 10) + 1):  # no client reads: nothing is granted
        await request.send_data(Channel.STDIN, bytes(64 << 10))
    assert await end.receive() is None
    assert end.ended is not None and "more than this end granted" in end.reason
    assert "more than this end granted" in (b.links / "flood.error").read_text()
    await end.close()
