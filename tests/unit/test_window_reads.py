"""File reads through the transfer window (guest -> host) against a fake, hostile agent.

The agent is a fake one on the other end of a socketpair (as in test_client_hostile.py), with
the window's key set in the client by hand: the fake agent writes pieces into the window
file, tags them, and sends references, well-formed or forged. A real agent's reads are
checked in tests/integration/test_window_reads.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.unit.test_client_hostile import VM, FakeAgent, Session, expect_broken
from warden._errors import ChannelAuthError, GuestFileError, ProtocolError
from warden.agent.client import AgentClient
from warden.agent.xferread import FOR_WRITES, READ_SLOTS
from warden.channel.window import WindowAuth, reads_key
from warden.wire.frame import (
    SESSION_VERSION,
    Channel,
    FrameType,
    decode_json,
    decode_xfer_ref,
    encode_json,
    encode_xfer_ref,
)
from warden.wire.ops import Key, Op

SLOT = 64 << 10
SLOTS = 8
KEY = bytes(range(32))


@pytest.fixture
def window_file(tmp_path: Path) -> Path:
    path = tmp_path / "xfer.img"
    path.write_bytes(bytes(SLOTS * SLOT))
    return path


@contextlib.asynccontextmanager
async def session(window: Path | None, *, reads: bool = True) -> AsyncIterator[Session]:
    """A client with the window at ``window`` (its key: KEY), connected to a fake agent that
    says it can read through the window (``reads``)."""
    host_sock, agent_sock = socket.socketpair()
    agent_reader, agent_writer = await asyncio.open_connection(sock=agent_sock)
    agent = FakeAgent(agent_reader, agent_writer)

    async def greet() -> None:
        offer = decode_json(await agent.frame())
        reply = {
            Key.VERSION: SESSION_VERSION,
            Key.NONCE: offer[Key.NONCE],
            Key.XFER: True,
            Key.XFER_READ: reads,
            Key.PID: 1,
        }
        agent_writer.write(encode_json(FrameType.HELLO, 0, reply))

    greeter = asyncio.create_task(greet())
    reader, writer = await asyncio.open_connection(sock=host_sock, limit=1 << 20)
    broken: list[Any] = []
    client = await AgentClient.from_streams(
        reader, writer, timeout=10, name=VM, on_broken=broken.append
    )
    await greeter
    client._window_key = KEY  # as an encrypted channel's HELLO would have handed it
    if window is not None:
        assert client.enable_xfer(window, slots=SLOTS, slot_size=SLOT)
    try:
        yield Session(client, agent, broken)
    finally:
        await client.close()
        agent_writer.close()


class FakeReader:
    """The agent's side of one window read: the slots lent to it, and the pieces it sends."""

    def __init__(self, s: Session, window: Path, auth: WindowAuth | None = None) -> None:
        self.s = s
        self.window = window
        self.auth = auth or WindowAuth(reads_key(KEY))
        self.rid = 0
        self.args: dict[str, Any] = {}
        self.lent: list[int] = []
        self.sequence = 0

    async def start(self) -> None:
        self.rid, self.args = await self.s.agent.request(Op.READ)

    async def slot(self) -> int:
        """The next slot lent to the read (waiting for one if none is)."""
        while not self.lent:
            frame = await self.s.agent.frame()
            if frame.type == FrameType.REQUEST:
                self.s.agent.respond(frame.request_id, {Key.OK: True})  # a watchdog ping
                continue
            assert frame.type == FrameType.DATA and frame.channel == Channel.XFER_READ, frame
            assert frame.request_id == self.rid
            offset, length = decode_xfer_ref(frame.payload)
            assert length == SLOT
            self.lent.append(offset)
        return self.lent.pop(0)

    def put(self, offset: int, piece: bytes, *, tag: bytes | None = None, rid: int = 0) -> None:
        """Write ``piece`` into the window at ``offset`` and send its reference (with its
        genuine tag under the next sequence number, unless ``tag`` is given)."""
        with open(self.window, "r+b") as f:
            f.seek(offset)
            f.write(piece)
        rid = rid or self.rid
        if tag is None:
            tag = self.auth.tag(rid, self.sequence, piece)
        self.sequence += 1
        self.s.agent.data(rid, Channel.XFER_READ, encode_xfer_ref(offset, len(piece), tag))

    async def send(self, data: bytes) -> None:
        """The whole file: pieces of up to a slot, then the end and the response."""
        for start in range(0, len(data), SLOT):
            self.put(await self.slot(), data[start : start + SLOT])
        self.finish(len(data))

    def finish(self, size: int) -> None:
        self.s.agent.writer.write(
            encode_json(FrameType.RESPONSE, self.rid, {Key.OK: True, Key.SIZE: size})
        )


async def read_all(client: AgentClient, path: str = "/f") -> bytes:
    return b"".join([chunk async for chunk in client.read_file(path)])


async def next_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    return await anext(chunks)


def free_slots(client: AgentClient) -> int:
    assert client._xfer is not None
    return client._xfer._free.qsize()


# --------------------------------------------------------------------------------------------
# well-behaved agents


@pytest.mark.parametrize("size", [SLOT - 1, SLOT, SLOT + 1, 3 * SLOT, 11 * SLOT + 4097])
async def test_a_read_through_the_window(window_file: Path, size: int) -> None:
    """More pieces than the read's slots: each slot is lent again once its piece was taken;
    the bytes come out intact, and every slot is free again at the end."""
    data = os.urandom(size)
    async with session(window_file) as s:
        read = asyncio.create_task(read_all(s.client))
        guest = FakeReader(s, window_file)
        await guest.start()
        assert guest.args.get(Key.XFER) is True
        await guest.send(data)
        assert await read == data
        assert free_slots(s.client) == SLOTS
        assert s.broken == []


async def test_reads_share_one_sequence_per_session(window_file: Path) -> None:
    """Pieces are numbered per session, across reads: a second read's first piece is tagged
    under the number after the first read's last."""
    async with session(window_file) as s:
        sequence = 0
        for size in (2 * SLOT, 3 * SLOT + 5):
            data = os.urandom(size)
            read = asyncio.create_task(read_all(s.client))
            guest = FakeReader(s, window_file)
            guest.sequence = sequence
            await guest.start()
            await guest.send(data)
            assert await read == data
            sequence = guest.sequence
        assert free_slots(s.client) == SLOTS


async def test_an_agent_without_window_reads_gets_a_stream(window_file: Path) -> None:
    async with session(window_file, reads=False) as s:
        read = asyncio.create_task(read_all(s.client))
        rid, args = await s.agent.request(Op.READ)
        assert Key.XFER not in args
        s.agent.data(rid, Channel.FILE, b"streamed")
        s.agent.respond(rid, {Key.OK: True, Key.SIZE: 8})
        assert await read == b"streamed"
        assert free_slots(s.client) == SLOTS


async def test_a_read_streams_while_no_slot_is_free(window_file: Path) -> None:
    async with session(window_file) as s:
        assert s.client._xfer is not None
        held = [s.client._xfer._free.get_nowait() for _ in range(SLOTS)]  # as writes would
        read = asyncio.create_task(read_all(s.client))
        rid, args = await s.agent.request(Op.READ)
        assert Key.XFER not in args
        s.agent.data(rid, Channel.FILE, b"streamed")
        s.agent.respond(rid, {Key.OK: True, Key.SIZE: 8})
        assert await read == b"streamed"
        s.client._xfer.give_back(held)
        assert free_slots(s.client) == SLOTS


async def test_a_read_the_agent_refuses_gives_its_slots_back(window_file: Path) -> None:
    async with session(window_file) as s:
        read = asyncio.create_task(read_all(s.client, "/missing"))
        guest = FakeReader(s, window_file)
        await guest.start()
        assert free_slots(s.client) == SLOTS - READ_SLOTS
        error = {Key.OK: False, Key.ERROR: "file", Key.ERRNO: 2, Key.STRERROR: "No such file"}
        s.agent.respond(guest.rid, error)
        with pytest.raises(GuestFileError, match="No such file"):
            await read
        assert free_slots(s.client) == SLOTS
        assert s.broken == []


async def test_reads_leave_slots_to_writes(window_file: Path) -> None:
    """Reads hold at most all but FOR_WRITES slots: a read beyond that streams, and a write
    (from a caller that holds the reads open) still finds free slots."""
    assert SLOTS - FOR_WRITES == READ_SLOTS  # room for one read through the window
    async with session(window_file) as s:
        first = cast(AsyncGenerator[bytes, None], s.client.read_file("/1"))
        taking = asyncio.create_task(next_chunk(first))
        guest = FakeReader(s, window_file)
        await guest.start()
        guest.lent = [await guest.slot() for _ in range(READ_SLOTS)]
        second = asyncio.create_task(read_all(s.client, "/2"))
        rid, args = await s.agent.request(Op.READ)
        assert Key.XFER not in args  # no slot for it: it streams
        s.agent.data(rid, Channel.FILE, b"streamed")
        s.agent.respond(rid, {Key.OK: True, Key.SIZE: 8})
        assert await second == b"streamed"
        write = asyncio.create_task(s.client.write_file("/w", bytes(2 * SLOT)))
        wid, _ = await s.agent.request(Op.WRITE)
        while (frame := await s.agent.frame()).type != FrameType.EOF:
            assert frame.channel == Channel.XFER and frame.request_id == wid
            s.agent.data(wid, Channel.XFER, frame.payload)
        s.agent.respond(wid, {Key.OK: True, Key.SIZE: 2 * SLOT})
        assert await write == 2 * SLOT
        guest.put(await guest.slot(), b"1" * SLOT)
        assert await taking == b"1" * SLOT
        await first.aclose()


async def test_a_consumer_that_leaves_early_frees_the_slots(window_file: Path) -> None:
    """Filled slots are free at once; lent ones only once the agent answered (it may still be
    writing into them until then)."""
    async with session(window_file) as s:
        guest = FakeReader(s, window_file)
        chunks = cast(AsyncGenerator[bytes, None], s.client.read_file("/f"))
        first = asyncio.create_task(next_chunk(chunks))
        await guest.start()
        guest.put(await guest.slot(), b"a" * SLOT)
        guest.put(await guest.slot(), b"b" * SLOT)
        assert await first == b"a" * SLOT
        await chunks.aclose()
        cancel = await s.agent.frame()
        while cancel.channel == Channel.XFER_READ:  # the rest of the slots lent at the start
            cancel = await s.agent.frame()
        assert (cancel.type, cancel.request_id) == (FrameType.CANCEL, guest.rid)
        assert free_slots(s.client) == SLOTS - READ_SLOTS + 2  # the two filled ones
        guest.finish(2 * SLOT)  # the agent's answer to the cancel
        async with asyncio.timeout(10):
            while free_slots(s.client) != SLOTS:
                await asyncio.sleep(0.01)
        assert s.broken == []


# --------------------------------------------------------------------------------------------
# hostile agents


FORGERIES = {
    "never-lent": "not lent to that read",
    "other-request": "not lent to that read",
    "twice": "holding a piece already",
    "longer-than-a-slot": "beyond its slot",
    "no-tag": "tag missing",
    "past-the-window": "not lent to that read",
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_forged_piece_references_end_the_session(window_file: Path, forgery: str) -> None:
    """The reader never hands on a byte of a forged reference: the session ends first."""
    async with session(window_file) as s:
        chunks = s.client.read_file("/f")
        first_chunk = asyncio.create_task(next_chunk(chunks))
        guest = FakeReader(s, window_file)
        await guest.start()
        guest.put(await guest.slot(), b"x" * SLOT)  # a genuine piece is accepted
        assert await first_chunk == b"x" * SLOT  # (its slot is not lent again yet)
        second = await guest.slot()
        guest.put(second, b"y" * SLOT)  # filled, not taken
        third = await guest.slot()
        piece = b"z" * SLOT
        tag = guest.auth.tag(guest.rid, guest.sequence, piece)
        reference = {
            "never-lent": encode_xfer_ref(SLOTS * SLOT - SLOT, SLOT, tag),
            "other-request": encode_xfer_ref(third, SLOT, tag),
            "twice": encode_xfer_ref(second, SLOT, tag),
            "longer-than-a-slot": encode_xfer_ref(third, SLOT + 4096, tag),
            "no-tag": encode_xfer_ref(third, SLOT),
            "past-the-window": encode_xfer_ref(1 << 40, SLOT, tag),
        }[forgery]
        assert SLOTS * SLOT - SLOT not in (second, third, *guest.lent)
        rid = guest.rid + 1 if forgery == "other-request" else guest.rid
        s.agent.data(rid, Channel.XFER_READ, reference)
        await asyncio.sleep(0.2)  # the forgery arrives before the caller asks for more
        await expect_broken(s, anext(chunks), ProtocolError, FORGERIES[forgery])


@pytest.mark.parametrize("attack", ["altered", "replayed", "other-direction", "wrong-request"])
async def test_a_piece_that_fails_authentication_is_never_handed_on(
    window_file: Path, attack: str
) -> None:
    """An altered piece (its bytes changed after it was tagged), a replayed one (an earlier
    piece and tag again, under a later number), one tagged with the host -> guest key, or for
    another request: the read fails with ChannelAuthError before any byte of it is used."""
    async with session(window_file) as s:
        chunks = s.client.read_file("/f")
        first_chunk = asyncio.create_task(next_chunk(chunks))
        guest = FakeReader(s, window_file)
        await guest.start()
        good = os.urandom(SLOT)
        good_tag = guest.auth.tag(guest.rid, 0, good)
        guest.put(await guest.slot(), good)
        assert await first_chunk == good
        bad = os.urandom(SLOT)
        offset = await guest.slot()
        tag = {
            "altered": guest.auth.tag(guest.rid, 1, bad[:-1] + bytes([bad[-1] ^ 1])),
            "replayed": good_tag,
            "other-direction": WindowAuth(KEY).tag(guest.rid, 1, bad),
            "wrong-request": guest.auth.tag(guest.rid + 1, 1, bad),
        }[attack]
        guest.put(offset, good if attack == "replayed" else bad, tag=tag)
        await expect_broken(s, anext(chunks), ChannelAuthError, "failed authentication")


async def test_slots_lent_to_a_read_are_not_used_by_a_write(window_file: Path) -> None:
    """While a read holds slots, a write's pieces go into the other slots only."""
    async with session(window_file) as s:
        read = asyncio.create_task(read_all(s.client))
        guest = FakeReader(s, window_file)
        await guest.start()
        lent = {await guest.slot() for _ in range(READ_SLOTS)}
        guest.lent = sorted(lent)
        write = asyncio.create_task(s.client.write_file("/w", bytes(3 * SLOT)))
        wid, _ = await s.agent.request(Op.WRITE)
        for _ in range(3):
            frame = await s.agent.frame()
            assert frame.channel == Channel.XFER and frame.request_id == wid
            assert decode_xfer_ref(frame.payload)[0] not in lent
            s.agent.data(wid, Channel.XFER, frame.payload)
        assert (await s.agent.frame()).type == FrameType.EOF
        s.agent.respond(wid, {Key.OK: True, Key.SIZE: 3 * SLOT})
        assert await write == 3 * SLOT
        await guest.send(b"z" * (2 * SLOT))
        assert await read == b"z" * (2 * SLOT)
        assert free_slots(s.client) == SLOTS


def test_the_guest_tags_pieces_in_place_as_the_host_checks_them() -> None:
    """The agent tags a piece in place (EVP over its mmap, where libcrypto loads); the host
    checks it with ``cryptography``: the two agree, and a tag under the other direction's key
    does not pass."""
    import mmap

    from warden.channel import evp

    if not evp.load():
        pytest.skip("libcrypto cannot be loaded here")
    buffer = mmap.mmap(-1, SLOT)
    buffer[:] = os.urandom(SLOT)
    guest = WindowAuth(reads_key(KEY))
    assert guest._evp is not None
    tag = guest.tag_in_place(9, 3, memoryview(buffer)[:1000])
    host = WindowAuth(reads_key(KEY))
    assert host.check(9, 3, bytes(buffer[:1000]), tag)
    assert tag == host.tag(9, 3, bytes(buffer[:1000]))
    assert not host.check(9, 4, bytes(buffer[:1000]), tag)
    assert not WindowAuth(KEY).check(9, 3, bytes(buffer[:1000]), tag)
    assert reads_key(KEY) != KEY
