"""A hostile peer on a ring link: whatever it writes into the shared region, this end closes the
link with a clear error (and NAME.error says so), never hangs, never crashes, never holds more
than its ring.

The pure half drives guest/ring.py's reader and writer over a bytearray full of garbage; the
agent half runs a real guest agent (end ``b``, tests/ringagents.py) while the test plays end
``a`` by writing into the region file directly, as a compromised guest could.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ringagents import Agents, agents, connect, ended, ring_options
from warden.channel.linkseal import Sealer
from warden.guest.ring import Ring, RingError
from warden.wire.ring import (
    CAPACITY,
    DATA,
    HEAD,
    KIND_DATA,
    MAX_RECORD,
    RECORD,
    REGION_SIZE,
    TAIL,
    span,
)

U64 = struct.Struct("<Q")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.integers(0, 255),
    st.integers(0, (1 << 64) - 1),
)
def test_garbage_counters_and_headers_are_refused_or_bounded(
    head: int, size: int, kind: int, tail: int
) -> None:
    region = bytearray(REGION_SIZE)
    U64.pack_into(region, HEAD[0], head)
    U64.pack_into(region, TAIL[1], tail)
    RECORD.pack_into(region, DATA[0], size, kind)
    b = Ring(region, "b")
    try:
        got = b.take()
    except RingError:
        pass
    else:
        if got is not None:
            assert len(got[1]) <= MAX_RECORD and span(len(got[1])) <= head
        assert b.tail <= head
    try:
        free = b.free()  # b's own ring: a's tail of it
    except RingError:
        assert tail != 0
    else:
        assert tail == 0 and free == CAPACITY


def test_the_writer_refuses_a_tail_going_backwards() -> None:
    region = bytearray(REGION_SIZE)
    a = Ring(region, "a")
    assert a.put(KIND_DATA, b"x" * 100)
    U64.pack_into(region, TAIL[0], a.head)  # b read it
    assert a.free() == CAPACITY
    U64.pack_into(region, TAIL[0], 0)
    with pytest.raises(RingError, match="tail"):
        a.free()


# -- a real agent against a hostile end a


@pytest.fixture
async def one(tmp_path: Path) -> AsyncIterator[Agents]:
    async with agents(tmp_path, ("b",)) as found:
        yield found


def _record(region: mmap.mmap, at: int, size: int, kind: int, payload: bytes = b"") -> None:
    RECORD.pack_into(region, DATA[0] + at, size, kind)
    region[DATA[0] + at + RECORD.size : DATA[0] + at + RECORD.size + len(payload)] = payload


def _forged(region: mmap.mmap) -> None:
    record = Sealer(os.urandom(32), "a").seal(b"hello")  # well framed, under another key
    _record(region, 0, len(record), KIND_DATA, record)
    U64.pack_into(region, HEAD[0], span(len(record)))


def _too_long(region: mmap.mmap) -> None:
    _record(region, 0, MAX_RECORD + 1, KIND_DATA)
    U64.pack_into(region, HEAD[0], CAPACITY)


def _beyond_head(region: mmap.mmap) -> None:
    _record(region, 0, 4096, KIND_DATA)
    U64.pack_into(region, HEAD[0], 64)


def _unknown_kind(region: mmap.mmap) -> None:
    _record(region, 0, 16, 7)
    U64.pack_into(region, HEAD[0], 64)


def _bad_pad(region: mmap.mmap) -> None:
    _record(region, 0, 8, 0xFF)
    U64.pack_into(region, HEAD[0], 64)


def _unaligned_head(region: mmap.mmap) -> None:
    U64.pack_into(region, HEAD[0], 13)


def _head_too_far(region: mmap.mmap) -> None:
    U64.pack_into(region, HEAD[0], CAPACITY + 8)


def _tail_beyond_head(region: mmap.mmap) -> None:
    U64.pack_into(region, TAIL[1], 1 << 40)  # b's own ring: b's writer checks it


HOSTILE: dict[str, tuple[Callable[[mmap.mmap], None], str]] = {
    "forged ciphertext": (_forged, "failed authentication"),
    "a record longer than the maximum": (_too_long, "a record of"),
    "a record beyond the head": (_beyond_head, "a record of"),
    "an unknown kind": (_unknown_kind, "unknown kind"),
    "a pad short of the ring's end": (_bad_pad, "pad record"),
    "an unaligned head": (_unaligned_head, "head"),
    "a head more than the ring ahead": (_head_too_far, "head"),
    "a tail beyond this end's head": (_tail_beyond_head, "tail"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_peer_gets_the_link_closed_with_an_error(one: Agents, case: str) -> None:
    corrupt, says = HOSTILE[case]
    link_id = os.urandom(16)
    path = one.region("evil", link_id)
    b = one.by_name["b"]
    end = await b.client.open_link("evil", os.urandom(32), "b", ring_options(link_id))
    reader, writer = await connect(b.links / "evil.sock")
    writer.write(b"some bytes for a")  # b's writer then reads its tail
    await writer.drain()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), REGION_SIZE) as region:
        await asyncio.sleep(0.1)
        corrupt(region)
        writer.write(b"and more")  # b's writer reads its tail again
        answer = await ended(end, timeout=5)
    assert answer["clean"] is False and says in str(answer["reason"]), answer
    # the client sees the end (ECONNRESET if the agent had not read all it sent)...
    with contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""
    error = (b.links / "evil.error").read_text()
    assert says in error  # ...and why
    assert "other end" in error
    await end.close()
    writer.close()


async def test_a_peer_that_never_reads_holds_the_writer_to_thering_options(one: Agents) -> None:
    """End a never reads: b's writer fills the ring once and waits (no unbounded memory: the
    agent's client socket then fills and the client blocks); link-close still ends it."""
    link_id = os.urandom(16)
    path = one.region("deaf", link_id)
    b = one.by_name["b"]
    end = await b.client.open_link("deaf", os.urandom(32), "b", ring_options(link_id))
    _, writer = await connect(b.links / "deaf.sock")
    writer.write(os.urandom(32 << 20))
    await asyncio.sleep(1.0)
    with open(path, "rb") as f:
        head = U64.unpack(os.pread(f.fileno(), 8, HEAD[1]))[0]
    assert CAPACITY - span(MAX_RECORD) <= head <= CAPACITY  # the ring is full, no more
    assert writer.transport.get_write_buffer_size() > 16 << 20  # the client is held back
    started = asyncio.get_running_loop().time()
    assert await b.client.close_link("deaf", "gone") is True
    assert asyncio.get_running_loop().time() - started < 0.1
    assert (await ended(end))["clean"] is False
    await end.close()
    writer.close()
