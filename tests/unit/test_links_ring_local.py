"""Ring links between two real guest agents run on the host (no VM), over one region file.

The test plays the host (tests/ringagents.py): it makes the region file and opens both ends;
the agents map the file MAP_SHARED, as two QEMUs map the link's memfd, and move the records
through it without the host. The VM tests do the same through real guests and PCI devices.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.ringagents import Agents, agents, connect, ended, ring_options
from warden._errors import AgentError
from warden.wire.ring import REGION_SIZE

MARKER = b"PLAINTEXT-MARKER-7f3a9c"


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Agents]:
    async with agents(tmp_path) as found:
        yield found


def _payload(size: int) -> bytes:
    """Random bytes with the marker in them every MiB."""
    chunks = []
    for _ in range(size >> 20):
        chunks.append(MARKER + os.urandom((1 << 20) - len(MARKER)))
    return b"".join(chunks)


async def _stream_both_ways(two: Agents, name: str, size: int, *, plain: bool) -> Path:
    end_a, end_b, region = await two.link(name, plain=plain)
    a, b = two.by_name["a"], two.by_name["b"]
    ra, wa = await connect(a.links / f"{name}.sock")
    rb, wb = await connect(b.links / f"{name}.sock")
    out_a, out_b = _payload(size), _payload(size)

    async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), 1 << 20):
            writer.write(data[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    async def receive(reader: asyncio.StreamReader) -> str:
        digest = hashlib.sha256()
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()

    _, _, got_b, got_a = await asyncio.wait_for(
        asyncio.gather(send(wa, out_a), send(wb, out_b), receive(rb), receive(ra)), 120
    )
    assert got_b == hashlib.sha256(out_a).hexdigest()
    assert got_a == hashlib.sha256(out_b).hexdigest()
    for end in (end_a, end_b):
        answer = await ended(end)
        assert answer["clean"] is True, answer
        await end.close()
    assert not (a.links / f"{name}.error").exists() and not (b.links / f"{name}.error").exists()
    wa.close()
    wb.close()
    return region


async def test_64_mib_each_way_at_once_intact_and_only_ciphertext_in_the_region(
    two: Agents,
) -> None:
    region = await _stream_both_ways(two, "big", 64 << 20, plain=False)
    data = region.read_bytes()
    assert len(data) == REGION_SIZE
    assert MARKER not in data


async def test_the_plain_ring_carries_plaintext(two: Agents) -> None:
    """The benchmark's plaintext ring (and the control of the test above: the marker shows)."""
    region = await _stream_both_ways(two, "plain", 8 << 20, plain=True)
    assert MARKER in region.read_bytes()


async def test_eof_each_way_then_the_link_ends_clean(two: Agents) -> None:
    end_a, end_b, _ = await two.link("eof")
    a, b = two.by_name["a"], two.by_name["b"]
    ra, wa = await connect(a.links / "eof.sock")
    rb, wb = await connect(b.links / "eof.sock")
    wa.write(b"ping")
    wa.write_eof()
    assert await rb.read() == b"ping"  # then EOF: a's END record
    wb.write(b"pong")
    await wb.drain()
    assert await ra.readexactly(4) == b"pong"
    assert end_a.ended is None  # b has not ended its direction yet
    wb.write_eof()
    assert await ra.read() == b""
    assert (await ended(end_a))["clean"] is True
    assert (await ended(end_b))["clean"] is True
    wa.close()
    wb.close()


async def test_link_close_is_prompt_while_the_peer_does_not_read(two: Agents) -> None:
    """a's client writes until everything is full (b's client never reads): a's agent waits
    for room in the ring, b's in its write to the client; link-close still ends both fast, and
    neither touches the region after its answer (the test truncates it then, as the host does:
    a later touch would kill the agent with SIGBUS)."""
    end_a, end_b, region = await two.link("stuck")
    a, b = two.by_name["a"], two.by_name["b"]
    _, wa = await connect(a.links / "stuck.sock")
    _, wb = await connect(b.links / "stuck.sock")
    wa.write(os.urandom(16 << 20))
    await asyncio.sleep(1.0)  # the ring is full, b's client socket too
    assert wa.transport.get_write_buffer_size() > 0  # a's client is blocked
    for agent in (a, b):
        start = time.perf_counter()
        assert await agent.client.close_link("stuck", "the link was removed") is True
        took = time.perf_counter() - start
        assert took < 0.1, took
    os.truncate(region, 0)  # what the host does once both answered
    for end in (end_a, end_b):
        answer = await ended(end)
        assert answer["clean"] is False and answer["reason"] == "the link was removed"
        await end.close()
    for agent in (a, b):
        assert (agent.links / "stuck.error").read_text().strip() == "the link was removed"
    wa.close()
    wb.close()
    await asyncio.sleep(0.3)  # an agent touching the truncated file would die: the fixture sees it


async def test_bad_ring_arguments_are_refused_at_once(two: Agents) -> None:
    client = two.by_name["a"].client
    with pytest.raises(AgentError, match="16 bytes"):
        await client.open_link("x", bytes(32), "a", ring_options(b"short"))
    request = {"op": "link-open", "name": "x", "key": bytes(32).hex(), "role": "a"}
    with pytest.raises(AgentError, match="transport"):
        await client._call({**request, "transport": "pigeon"})
    with pytest.raises(AgentError, match="ring transport only"):
        await client._call({**request, "plain": True})
    assert not (two.by_name["a"].links / "x.sock").exists()


async def test_a_region_of_another_link_is_refused_leaving_nothing(two: Agents) -> None:
    two.region("other", os.urandom(16))  # a region, but not this link's
    client = two.by_name["a"].client
    start = time.monotonic()
    with pytest.raises(AgentError, match="no shared-memory region of this link"):
        await client.open_link("lost", bytes(32), "a", ring_options(os.urandom(16)))
    assert 9 < time.monotonic() - start < 20
    assert not (two.by_name["a"].links / "lost.sock").exists()
    assert not (two.by_name["a"].links / "lost.error").exists()
    # the name is free again, and a region mapped by an open link is skipped by the next
    end_a, end_b, _ = await two.link("lost")
    end_a2, end_b2, _ = await two.link("second")
    for name in ("lost", "second"):
        assert await two.by_name["a"].client.close_link(name, "done") is True
        assert await two.by_name["b"].client.close_link(name, "done") is True
    for end in (end_a, end_b, end_a2, end_b2):
        await ended(end)
        await end.close()


async def test_a_cancel_while_looking_for_the_region_leaves_nothing(two: Agents) -> None:
    client = two.by_name["a"].client
    opening = asyncio.ensure_future(
        client.open_link("wait", bytes(32), "a", ring_options(bytes(16)))
    )
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    assert await client.close_link("wait", "never mind") is True
    assert time.perf_counter() - start < 0.2
    with pytest.raises(AgentError):
        await opening
    assert not (two.by_name["a"].links / "wait.sock").exists()
