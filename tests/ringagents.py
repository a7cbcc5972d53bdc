"""Real guest agents on the host (no VM) whose ring links use region files, not PCI devices.

Each agent is a subprocess on a socketpair (as in tests/unit/test_links_local.py) with its own
link directory (``WARDEN_LINK_DIR``) and a shared directory of region files
(``WARDEN_LINK_REGIONS``): the test plays the host, writing a region's header into a file of
``REGION_SIZE`` bytes, as the daemon does into the memfd it plugs into both VMs. The file is
mapped MAP_SHARED by both agents, as the memfd is by both QEMUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from warden.agent.client import AgentClient
from warden.agent.link import LinkEnd
from warden.wire.ops import Key
from warden.wire.ring import REGION_SIZE, pack_header

AGENT = [sys.executable, "-m", "warden.guest"]


def ring_options(link_id: bytes, plain: bool = False) -> dict[str, object]:
    """``open_link``'s options of a ring link."""
    return {Key.TRANSPORT: "ring", Key.LINK_ID: link_id.hex(), Key.PLAIN: plain}


@dataclass
class Agent:
    name: str
    client: AgentClient
    links: Path
    proc: subprocess.Popen[bytes]


@dataclass
class Agents:
    root: Path
    regions: Path
    by_name: dict[str, Agent] = field(default_factory=dict)

    def region(self, name: str, link_id: bytes) -> Path:
        """A fresh region file for link ``link_id``, as the host makes it."""
        path = self.regions / name
        with open(path, "wb") as f:
            f.write(pack_header(link_id))
            f.truncate(REGION_SIZE)
        return path

    async def link(
        self, name: str, *, plain: bool = False, key: bytes | None = None
    ) -> tuple[LinkEnd, LinkEnd, Path]:
        """A ring link between agents a and b (its region file made first, as the host does)."""
        link_id, key = os.urandom(16), key or os.urandom(32)
        region = self.region(name, link_id)
        a, b = self.by_name["a"].client, self.by_name["b"].client
        end_a = await a.open_link(name, key, "a", ring_options(link_id, plain))
        end_b = await b.open_link(name, key, "b", ring_options(link_id, plain))
        return end_a, end_b, region


@contextlib.asynccontextmanager
async def agents(tmp_path: Path, names: tuple[str, ...] = ("a", "b")) -> AsyncIterator[Agents]:
    """Agents ``names``; on exit each must have exited 0 and logged no traceback."""
    found = Agents(tmp_path, tmp_path / "regions")
    found.regions.mkdir()
    parents = []
    try:
        for name in names:
            parent, child = socket.socketpair()
            links = tmp_path / name
            links.mkdir()
            env = {**os.environ, "WARDEN_LINK_DIR": str(links)}
            env["WARDEN_LINK_REGIONS"] = str(found.regions)
            proc = subprocess.Popen(
                [*AGENT, "--fd", str(child.fileno()), "--user-home", str(tmp_path)],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115 - the child has it
                env=env,
            )
            child.close()
            parents.append(parent)
            reader, writer = await asyncio.open_connection(sock=parent, limit=1 << 20)
            client = await AgentClient.from_streams(reader, writer, timeout=10)
            found.by_name[name] = Agent(name, client, links, proc)
        yield found
    finally:
        for agent in found.by_name.values():
            await agent.client.close()
        for parent in parents:
            parent.close()
        for agent in found.by_name.values():
            assert agent.proc.wait(timeout=10) == 0, f"agent {agent.name} died"
            log = (tmp_path / f"{agent.name}.log").read_text(errors="replace")
            assert "Traceback" not in log, log


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(500):
        if path.exists():
            return await asyncio.open_unix_connection(str(path), limit=1 << 20)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


async def ended(end: LinkEnd, timeout: float = 10) -> dict[str, object]:
    """The agent's answer to the end's ``link-open`` (the link ended)."""
    async with asyncio.timeout(timeout):
        assert await end.receive() is None  # a ring link sends no records to the host
    assert end.ended is not None
    return end.ended
