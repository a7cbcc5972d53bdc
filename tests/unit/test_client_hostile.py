"""The host client of the guest agent against a hostile agent.

The agent here is a fake one, written in the test, on the other end of a socketpair: a real
agent never breaks the protocol, and these tests are about what the client does when the guest
does (DATA beyond its credit, forged transfer acknowledgements, silence, a frozen channel).
tests/security/test_forged_acks.py does the same through a real VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from warden._errors import (
    AgentUnresponsiveError,
    ProtocolError,
    SandboxClosedError,
    SpecError,
    WardenError,
)
from warden.agent import client as client_module
from warden.agent.client import AgentClient, Deadlines
from warden.wire.frame import (
    INITIAL_WINDOW,
    SESSION_VERSION,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    decode_json,
    decode_window,
    decode_xfer_ref,
    encode,
    encode_json,
    encode_window,
    encode_xfer_ref,
)
from warden.wire.ops import Key, Op

VM = "vm-under-test"
SLOT = 64 << 10


@dataclass
class FakeAgent:
    """The agent's end of the connection, driven by the test."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    pending: list[Frame] = field(default_factory=list)

    async def frame(self, timeout: float = 10.0) -> Frame:
        async with asyncio.timeout(timeout):
            while not self.pending:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise EOFError("the client closed the connection")
                self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def request(self, op: str | None = None) -> tuple[int, dict[str, Any]]:
        """The next REQUEST (skipping the watchdog's pings unless ``op`` is ping)."""
        while True:
            frame = await self.frame()
            if frame.type != FrameType.REQUEST:
                continue
            args = decode_json(frame)
            if args[Key.OP] == Op.PING and op != Op.PING:
                self.respond(frame.request_id, {Key.OK: True})
                continue
            assert op is None or args[Key.OP] == op, args
            return frame.request_id, args

    def data(self, rid: int, channel: Channel, payload: bytes) -> None:
        self.writer.write(encode(Frame(FrameType.DATA, rid, channel, payload)))

    def respond(self, rid: int, response: dict[str, Any]) -> None:
        self.writer.write(encode_json(FrameType.RESPONSE, rid, response))


@dataclass
class Session:
    client: AgentClient
    agent: FakeAgent
    broken: list[WardenError]


@contextlib.asynccontextmanager
async def session(
    *,
    version: int = SESSION_VERSION,
    xfer: bool = False,
    deadlines: Deadlines | None = None,
) -> AsyncIterator[Session]:
    """A client connected to a fake agent that answered its HELLO with ``version``."""
    host_sock, agent_sock = socket.socketpair()
    agent_reader, agent_writer = await asyncio.open_connection(sock=agent_sock)
    agent = FakeAgent(agent_reader, agent_writer)

    async def greet() -> None:
        offer = decode_json(await agent.frame())
        assert offer[Key.VERSIONS] == [SESSION_VERSION]
        reply = {Key.VERSION: version, Key.NONCE: offer[Key.NONCE], Key.XFER: xfer, Key.PID: 1}
        agent_writer.write(encode_json(FrameType.HELLO, 0, reply))

    greeter = asyncio.create_task(greet())
    reader, writer = await asyncio.open_connection(sock=host_sock, limit=1 << 20)
    broken: list[WardenError] = []
    client = await AgentClient.from_streams(
        reader, writer, timeout=10, name=VM, on_broken=broken.append, deadlines=deadlines
    )
    await greeter
    try:
        yield Session(client, agent, broken)
    finally:
        await client.close()
        agent_writer.close()


async def expect_broken(
    s: Session, pending: Awaitable[object], kind: type[WardenError], match: str
) -> WardenError:
    """``pending`` fails with ``kind``; the message names the VM; on_broken heard it once."""
    with pytest.raises(kind, match=match) as caught:
        await pending
    assert VM in str(caught.value)
    assert s.client.closed
    await asyncio.sleep(0)
    assert len(s.broken) == 1, s.broken
    assert isinstance(s.broken[0], kind)
    return caught.value


# --------------------------------------------------------------------------------------------
# interfaces: user, max_output, session versions


async def test_user_is_sent_with_every_request() -> None:
    async with session() as s:

        async def serve(count: int) -> list[dict[str, Any]]:
            seen = []
            for _ in range(count):
                rid, args = await s.agent.request()
                seen.append(args)
                if args[Key.OP] == Op.WRITE:
                    while (await s.agent.frame()).type != FrameType.EOF:
                        pass
                entry = {"name": "x", "path": "/x", "type": "file", "size": 1, "mode": 420}
                s.agent.respond(
                    rid,
                    {
                        Key.OK: True,
                        Key.EXIT_CODE: 0,
                        Key.SIZE: 1,
                        Key.ENTRY: {**entry, "mtime": 0.0},
                        Key.ENTRIES: [],
                    },
                )
            return seen

        server = asyncio.create_task(serve(7))
        c = s.client
        await c.exec(["true"])
        await c.exec("true", user="root")
        await c.write_file("/x", b"x", user="root")
        await c.read_file_bytes("/x")
        await c.stat("/x", user="root")
        await c.list_dir("/", user="user")
        await c.make_dir("/d", user="root")
        users = [args[Key.USER] for args in await server]
        assert users == ["user", "root", "root", "user", "root", "user", "root"]
        with pytest.raises(SpecError, match="user"):
            await c.remove("/x", user="nobody")
        with pytest.raises(SpecError, match="max_output"):
            await c.exec(["true"], max_output=-1)
        assert s.broken == []


async def test_max_output_caps_what_is_collected() -> None:
    async with session() as s:
        for limit, expect_cut in ((1000, True), (0, True), (5000, False)):
            seen: list[bytes] = []
            call = asyncio.create_task(
                s.client.exec(["x"], max_output=limit, on_stdout=seen.append)
            )
            rid, _ = await s.agent.request(Op.EXEC)
            for _ in range(3):
                s.agent.data(rid, Channel.STDOUT, b"o" * 1000)
            s.agent.data(rid, Channel.STDERR, b"e" * 10)
            s.agent.respond(rid, {Key.OK: True, Key.EXIT_CODE: 3})
            result = await call
            assert result.exit_code == 3
            assert result.stdout == b"o" * min(limit, 3000)
            assert result.stderr == b"e" * min(limit, 10)
            assert result.truncated is expect_cut
            assert b"".join(seen) == b"o" * 3000  # the callback saw everything
        assert s.client.session_version == SESSION_VERSION


@pytest.mark.parametrize("version", [1, 3])  # 1: the agents of older images
async def test_an_agent_choosing_a_version_not_offered_is_refused(version: int) -> None:
    with pytest.raises(ProtocolError, match=f"session version {version}.*warden image build"):
        async with session(version=version):
            pass


# --------------------------------------------------------------------------------------------
# flow control


async def test_data_beyond_the_credit_ends_the_session() -> None:
    async with session() as s:
        gate = asyncio.Event()

        async def blocked(_: bytes) -> None:
            await gate.wait()

        call = asyncio.create_task(s.client.exec(["x"], on_stdout=blocked))
        rid, _ = await s.agent.request(Op.EXEC)
        s.agent.data(rid, Channel.STDOUT, bytes(INITIAL_WINDOW))  # all of the credit: fine
        await asyncio.sleep(0.2)
        assert not s.client.closed
        s.agent.data(rid, Channel.STDOUT, b"!")  # one byte more
        async with asyncio.timeout(5):
            while not s.client.closed:  # noticed by the reader, while the consumer is blocked
                await asyncio.sleep(0.01)
        gate.set()
        await expect_broken(s, call, ProtocolError, "beyond its flow-control credit")
        report = await s.agent.frame()  # the client told the agent why
        assert (report.type, report.request_id) == (FrameType.ERROR, 0)


async def test_a_link_end_granting_past_the_bound_ends_the_session() -> None:
    """A link's agent grants the host STDIN credit; more than MAX_SEND_CREDIT is refused, so
    a guest cannot make the relay hold what the other end sends."""
    async with session() as s:
        call = asyncio.create_task(s.client.open_link("l", bytes(32), "a"))
        rid, args = await s.agent.request(Op.LINK_OPEN)
        assert args[Key.NAME] == "l" and args[Key.ROLE] == "a"
        s.agent.writer.write(encode_window(rid, Channel.STDIN, INITIAL_WINDOW))
        end = await call
        assert end._request.send_credit == INITIAL_WINDOW
        s.agent.writer.write(encode_window(rid, Channel.STDIN, client_module.MAX_SEND_CREDIT))
        await expect_broken(s, end.receive(), ProtocolError, "granted more than")


async def test_a_window_on_a_request_that_is_not_a_link_ends_the_session() -> None:
    async with session() as s:
        call = asyncio.create_task(s.client.exec(["x"]))
        rid, _ = await s.agent.request(Op.EXEC)
        s.agent.writer.write(encode_window(rid, Channel.STDIN, 100))
        await expect_broken(s, call, ProtocolError, "unexpected WINDOW")


@pytest.mark.parametrize(
    ("channel", "ftype", "match"),
    [
        (Channel.FILE, FrameType.DATA, "FILE stream of a exec"),
        (Channel.STDIN, FrameType.EOF, "STDIN stream of a exec"),
        (Channel.STDOUT, FrameType.WINDOW, "unexpected WINDOW"),
    ],
)
async def test_frames_on_streams_the_request_does_not_have(
    channel: Channel, ftype: FrameType, match: str
) -> None:
    async with session() as s:
        call = asyncio.create_task(s.client.exec(["x"]))
        rid, _ = await s.agent.request(Op.EXEC)
        payload = bytes(4) if ftype != FrameType.EOF else b""
        s.agent.writer.write(encode(Frame(ftype, rid, channel, payload)))
        await expect_broken(s, call, ProtocolError, match)


async def test_data_after_the_end_of_a_stream() -> None:
    async with session() as s:
        call = asyncio.create_task(s.client.read_file_bytes("/x"))
        rid, _ = await s.agent.request(Op.READ)
        s.agent.writer.write(encode(Frame(FrameType.EOF, rid, Channel.FILE)))
        s.agent.data(rid, Channel.FILE, b"more")
        await expect_broken(s, call, ProtocolError, "after the end of the FILE stream")


async def windows(agent: FakeAgent, until: float) -> list[tuple[int, Channel, int]]:
    """The WINDOW frames the client sends until ``until`` (loop time), answering pings."""
    got = []
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        while loop.time() < until:
            frame = await agent.frame(timeout=max(0.01, until - loop.time()))
            if frame.type == FrameType.WINDOW:
                got.append((frame.request_id, frame.channel, decode_window(frame.payload)))
    return got


async def test_credit_is_granted_only_after_the_callback_returned() -> None:
    async with session() as s:
        gate = asyncio.Event()
        taken: list[int] = []

        async def slow_consumer(chunk: bytes) -> None:
            await gate.wait()
            taken.append(len(chunk))

        call = asyncio.create_task(s.client.exec(["x"], on_stdout=slow_consumer, max_output=0))
        rid, _ = await s.agent.request(Op.EXEC)
        for _ in range(4):
            s.agent.data(rid, Channel.STDOUT, bytes(INITIAL_WINDOW // 4))
        loop = asyncio.get_running_loop()
        assert await windows(s.agent, loop.time() + 0.5) == []  # the consumer took nothing yet
        gate.set()
        granted = await windows(s.agent, loop.time() + 0.5)
        assert sum(taken) == INITIAL_WINDOW
        assert granted and all(g[:2] == (rid, Channel.STDOUT) for g in granted)
        assert sum(g[2] for g in granted) == INITIAL_WINDOW  # exactly what was consumed
        s.agent.respond(rid, {Key.OK: True, Key.EXIT_CODE: 0})
        assert (await call).truncated


class WindowedProducer:
    """A well-behaved v2 agent streaming ``total`` bytes of stdout, within its credit."""

    def __init__(self, agent: FakeAgent, rid: int, total: int) -> None:
        self.agent, self.rid, self.total = agent, rid, total
        self.credit = INITIAL_WINDOW
        self.sent = 0

    async def run(self) -> None:
        chunk = 64 << 10
        while self.sent < self.total:
            while self.credit >= chunk and self.sent < self.total:
                self.agent.data(self.rid, Channel.STDOUT, bytes(chunk))
                self.credit -= chunk
                self.sent += chunk
            await self.agent.writer.drain()
            if self.sent >= self.total:
                break
            frame = await self.agent.frame()
            if frame.type == FrameType.WINDOW:
                self.credit += decode_window(frame.payload)
            elif frame.type == FrameType.REQUEST:  # the watchdog's ping
                self.agent.respond(frame.request_id, {Key.OK: True})
        self.agent.respond(self.rid, {Key.OK: True, Key.EXIT_CODE: 0})


async def test_slow_consumer_bounds_host_memory() -> None:
    """64 MiB through a consumer that sleeps now and then: the host never holds more than
    one window (sent by the agent, not yet taken by the consumer), and its traced memory stays
    far below what went through."""
    total = 64 << 20
    async with session() as s:
        held: list[int] = []
        consumed = 0
        producer: WindowedProducer | None = None

        async def slow(chunk: bytes) -> None:
            nonlocal consumed
            consumed += len(chunk)
            assert producer is not None
            held.append(producer.sent - consumed)
            if consumed % (4 << 20) == 0:
                await asyncio.sleep(0.05)

        tracemalloc.start()
        try:
            call = asyncio.create_task(s.client.exec(["x"], on_stdout=slow, max_output=0))
            rid, _ = await s.agent.request(Op.EXEC)
            producer = WindowedProducer(s.agent, rid, total)
            await producer.run()
            result = await call
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert consumed == total and result.truncated
        assert max(held) <= INITIAL_WINDOW
        assert peak < 12 << 20, f"peak traced memory {peak >> 20} MiB for a 64 MiB stream"


# --------------------------------------------------------------------------------------------
# the transfer window


@pytest.fixture
def window_file(tmp_path: Path) -> Path:
    path = tmp_path / "xfer.img"
    path.write_bytes(b"\xa5" * (4 * SLOT))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_the_window_frees_only_outstanding_references(window_file: Path) -> None:
    window = client_module._XferWindow(window_file, 4, SLOT)
    try:
        ref = await window.put(7, memoryview(b"x" * SLOT))
        assert ref is not None
        offset, length = decode_xfer_ref(ref)
        bad = [
            (7, encode_xfer_ref(offset + SLOT, length)),  # never outstanding
            (8, ref),  # another request's
            (7, encode_xfer_ref(offset, length - 4096)),  # the wrong length
            (7, b"short"),  # malformed
        ]
        for rid, reference in bad:
            assert window.acknowledge(rid, reference) is not None
            assert window.outstanding == 1 and window._free.qsize() == 3  # nothing was freed
        assert window.acknowledge(7, ref) is None
        assert window.outstanding == 0 and window._free.qsize() == 4
        assert window.acknowledge(7, ref) is not None  # already released
        assert window._free.qsize() == 4
    finally:
        window.close()


async def test_a_too_small_window_file_is_refused(window_file: Path) -> None:
    with pytest.raises(ValueError, match="slots"):
        client_module._XferWindow(window_file, 5, SLOT)


def ack(agent: FakeAgent, rid: int, reference: bytes) -> None:
    agent.data(rid, Channel.XFER, reference)


@pytest.mark.parametrize("forgery", ["never", "other-request", "length", "duplicate"])
async def test_forged_acknowledgements_end_the_session(window_file: Path, forgery: str) -> None:
    async with session(xfer=True) as s:
        assert s.client.enable_xfer(window_file, slots=4, slot_size=SLOT)
        write = asyncio.create_task(s.client.write_file("/f", bytes(3 * SLOT) + b"tail"))
        rid, _ = await s.agent.request(Op.WRITE)
        first = await s.agent.frame()
        assert (first.type, first.channel) == (FrameType.DATA, Channel.XFER)
        ack(s.agent, rid, first.payload)  # a genuine acknowledgement is accepted
        second = await s.agent.frame()  # so the next piece comes: outstanding, not acknowledged
        assert (second.type, second.channel) == (FrameType.DATA, Channel.XFER)
        offset, length = decode_xfer_ref(second.payload)
        before = digest(window_file)
        forged = {
            "never": (rid, encode_xfer_ref(1 << 40, length)),
            "other-request": (rid + 1, second.payload),
            "length": (rid, encode_xfer_ref(offset, length - 4096)),
            "duplicate": (rid, first.payload),
        }[forgery]
        ack(s.agent, *forged)
        await expect_broken(s, write, ProtocolError, "not outstanding for that request")
        assert digest(window_file) == before


async def test_a_write_through_the_window(window_file: Path) -> None:
    """The checks let a well-behaved agent through: 10 pieces in 4 slots, each acknowledged."""
    async with session(xfer=True) as s:
        s.client.enable_xfer(window_file, slots=4, slot_size=SLOT)
        payload = bytes(range(256)) * (10 * SLOT // 256)
        write = asyncio.create_task(s.client.write_file("/f", payload))
        rid, _ = await s.agent.request(Op.WRITE)
        got = bytearray()
        while True:
            frame = await s.agent.frame()
            if frame.type == FrameType.EOF:
                break
            offset, length = decode_xfer_ref(frame.payload)
            with open(window_file, "rb") as f:
                f.seek(offset)
                got += f.read(length)
            ack(s.agent, rid, frame.payload)
        s.agent.respond(rid, {Key.OK: True, Key.SIZE: len(got)})
        assert await write == len(payload)
        assert bytes(got) == payload
        assert s.broken == []


# --------------------------------------------------------------------------------------------
# deadlines


QUICK = Deadlines(call=0.5, ping_interval=0.2, ping=0.5)


QUICK_CALLS: list[Callable[[AgentClient], Awaitable[object]]] = [
    lambda c: c.ping(),
    lambda c: c.stat("/x"),
    lambda c: c.list_dir("/"),
    lambda c: c.remove("/x"),
    lambda c: c.make_dir("/d"),
    lambda c: c.info(),
]


@pytest.mark.parametrize("call", QUICK_CALLS)
async def test_a_quick_call_never_answered(
    call: Callable[[AgentClient], Awaitable[object]],
) -> None:
    async with session(deadlines=Deadlines(call=0.5, ping_interval=100, ping=100)) as s:
        start = time.monotonic()
        await expect_broken(s, call(s.client), AgentUnresponsiveError, "within 0.5s")
        assert 0.4 < time.monotonic() - start < 3


def long_call(client: AgentClient, op: str) -> Awaitable[object]:
    if op == Op.EXEC:
        return client.exec(["sleep", "1000"])
    if op == Op.READ:
        return client.read_file_bytes("/big")
    return client.write_file("/f", b"x")


@pytest.mark.parametrize("op", [Op.EXEC, Op.READ, Op.WRITE])
async def test_a_silent_agent_fails_long_calls_through_the_watchdog(op: str) -> None:
    async with session(deadlines=QUICK) as s:
        start = time.monotonic()
        error = await expect_broken(
            s, long_call(s.client, op), AgentUnresponsiveError, "liveness ping"
        )
        assert 0.6 < time.monotonic() - start < 5
        assert "Stop and remove the VM" in str(error)
        with pytest.raises(AgentUnresponsiveError):  # later calls fail at once, never hang
            await s.client.ping()


async def test_an_agent_that_answers_pings_keeps_a_long_call_alive() -> None:
    async with session(deadlines=QUICK) as s:
        call = asyncio.create_task(s.client.exec(["sleep", "2"]))
        rid, _ = await s.agent.request(Op.EXEC)
        pings = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.0
        with contextlib.suppress(TimeoutError):
            while loop.time() < until:
                frame = await s.agent.frame(timeout=until - loop.time())
                if frame.type == FrameType.REQUEST:
                    pings += 1
                    s.agent.respond(frame.request_id, {Key.OK: True})
        s.agent.respond(rid, {Key.OK: True, Key.EXIT_CODE: 0})
        assert (await call).exit_code == 0
        assert pings >= 3
        assert s.broken == []


async def test_a_host_loop_blocked_past_the_ping_deadline_is_not_the_agents_fault() -> None:
    """A synchronous callback blocks the host's loop while a ping is out: the answer arrives
    only after the deadline passed in loop time, and is still taken."""
    async with session(deadlines=QUICK) as s:
        call = asyncio.create_task(s.client.exec(["x"], on_stdout=lambda _: time.sleep(1.5)))
        rid, _ = await s.agent.request(Op.EXEC)
        ping = await s.agent.frame()  # the watchdog's first ping, 0.2 s in
        assert decode_json(ping)[Key.OP] == Op.PING
        s.agent.data(rid, Channel.STDOUT, b"x")  # its callback blocks the loop for 1.5 s
        await asyncio.sleep(0.1)
        s.agent.respond(ping.request_id, {Key.OK: True})
        s.agent.respond(rid, {Key.OK: True, Key.EXIT_CODE: 0})
        assert (await call).stdout == b"x"
        assert s.broken == []


async def test_a_send_that_blocks_has_a_deadline() -> None:
    """A frozen guest stops draining the socket: the write gives up after the call deadline."""
    async with session(deadlines=Deadlines(call=0.5, ping_interval=100, ping=100)) as s:
        start = time.monotonic()
        data = bytes(64 << 20)  # far more than the socket buffers hold; the agent reads none
        await expect_broken(s, s.client.write_file("/f", data), AgentUnresponsiveError, "reading")
        assert time.monotonic() - start < 5


async def test_on_broken_is_not_called_for_a_close_or_an_expected_power_off() -> None:
    async with session() as s:
        await s.client.close()
        with pytest.raises(SandboxClosedError):
            await s.client.ping()
        assert s.broken == []
    async with session() as s:
        shutdown = asyncio.create_task(s.client.shutdown())
        await s.agent.request(Op.SHUTDOWN)
        s.agent.writer.close()  # the guest powers off before it answers
        await shutdown
        assert s.broken == []


async def test_a_lost_connection_calls_on_broken_once() -> None:
    async with session() as s:
        call = asyncio.create_task(s.client.exec(["x"]))
        await s.agent.request(Op.EXEC)
        s.agent.writer.close()
        await expect_broken(s, call, WardenError, "closed the connection")


# --------------------------------------------------------------------------------------------
# taking over a stream (resync)


async def test_a_slow_answer_to_a_takeover_hello_does_not_break_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that takes over waits RESYNC_AFTER_S for the answer, then pads and says HELLO
    again. An agent that was only slow answers the first HELLO late, reports the padding as a
    protocol error, then answers the second: only that last answer may start the session (this
    failed under load before the second HELLO had a nonce of its own)."""
    monkeypatch.setattr(client_module, "RESYNC_AFTER_S", 0.2)
    host_sock, agent_sock = socket.socketpair()
    agent_reader, agent_writer = await asyncio.open_connection(sock=agent_sock)
    agent = FakeAgent(agent_reader, agent_writer)

    def answer(nonce: str) -> None:
        reply = {Key.VERSION: SESSION_VERSION, Key.NONCE: nonce, Key.XFER: False, Key.PID: 1}
        agent_writer.write(encode_json(FrameType.HELLO, 0, reply))

    async def slow_agent() -> None:
        first = decode_json(await agent.frame())
        await asyncio.sleep(0.5)  # past RESYNC_AFTER_S: the host pads and says HELLO again
        answer(first[Key.NONCE])
        agent.decoder.resync()  # as the real agent does after the padding's protocol error
        padding_error = {Key.ERROR: "protocol", Key.MESSAGE: "unsupported protocol version 0"}
        agent_writer.write(encode_json(FrameType.ERROR, 0, padding_error))
        second = decode_json(await agent.frame())
        answer(second[Key.NONCE])
        rid, _ = await agent.request(Op.PING)
        agent.respond(rid, {Key.OK: True})

    task = asyncio.create_task(slow_agent())
    reader, writer = await asyncio.open_connection(sock=host_sock, limit=1 << 20)
    client = await AgentClient.from_streams(reader, writer, timeout=10, name=VM, resync=True)
    try:
        await client.ping()
        await task
        assert not client.closed
    finally:
        await client.close()
        agent_writer.close()
