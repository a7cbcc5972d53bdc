"""The async host client of the guest agent.

One :class:`AgentClient` owns one byte stream to the agent (the unix socket QEMU serves for the
virtio-serial port, or any asyncio stream pair). A single reader task decodes frames and hands
each to the queue of the request it belongs to, so many requests and their streams interleave
on the connection::

    client = await AgentClient.connect_unix(vm_dir / "agent.sock", timeout=30, name=vm_id)
    result = await client.exec(["uname", "-r"])
    await client.write_file("/home/user/x.txt", b"hello")

The guest is hostile, so everything it sends is bounded, checked and has a deadline:

- **Memory.** Every stream the agent sends (stdout, stderr, a file read) has a flow-control
  window of ``INITIAL_WINDOW`` bytes. The client grants more credit (WINDOW frames) only once
  its consumer took the data (an output callback returned, the caller of
  :meth:`AgentClient.read_file` asked for the next chunk), so a slow consumer slows the guest
  down and the host holds at most one window per stream. DATA beyond the credit is a protocol
  error. ``exec`` collects at most ``max_output`` bytes of each stream.
- **The transfer window.** An acknowledgement is accepted only for a reference that is
  outstanding for that request, with its offset and length; anything else ends the session
  before the window file is touched.
- **Deadlines.** Quick calls (ping, info, stat, list, remove, mkdir, shutdown) must be answered
  within ``call_timeout``. While any request is pending, a watchdog pings the agent every
  ``ping_interval`` seconds and gives up after ``ping_timeout``; a send that blocks (a frozen
  guest stops draining the socket) gives up after ``call_timeout``. Each ends the connection
  with :class:`~warden.AgentUnresponsiveError`.

If the connection breaks, every pending request fails (:class:`~warden.ProtocolError` after a
malformed or forbidden frame, :class:`~warden.AgentUnresponsiveError` after a missed deadline,
:class:`~warden.AgentError` when the connection is lost, :class:`~warden.SandboxClosedError`
after :meth:`AgentClient.close`); no request waits forever. ``on_broken`` hears of each of these
but the last, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warden._errors import (
    AgentError,
    AgentTimeoutError,
    AgentUnresponsiveError,
    ChannelAuthError,
    CommandTimeoutError,
    GuestFileError,
    ProtocolError,
    SandboxClosedError,
    SpecError,
    WardenError,
)
from warden.agent.link import LinkEnd
from warden.agent.secure import ChannelLayer
from warden.agent.xferread import FOR_WRITES, READ_SLOTS, ReadSlots
from warden.channel.window import WINDOW_KEY_SIZE, WindowAuth, reads_key
from warden.wire.frame import (
    INITIAL_WINDOW,
    MAX_REQUEST_ID,
    RESYNC_PADDING_SIZE,
    SESSION_VERSION,
    XFER_ALIGN,
    XFER_MAX_LENGTH,
    Channel,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_json,
    decode_window,
    decode_xfer_ref,
    encode_header,
    encode_json,
    encode_window,
    encode_xfer_ref,
)
from warden.wire.ops import DEFAULT_USER, USERS, ErrorKind, Key, Op

if TYPE_CHECKING:
    from warden.vmm.idle import IdleGate

__all__ = [
    "CALL_TIMEOUT_S",
    "DEFAULT_MAX_OUTPUT",
    "PING_INTERVAL_S",
    "PING_TIMEOUT_S",
    "AgentClient",
    "BrokenCallback",
    "EntryInfo",
    "ExecResult",
    "OutputCallback",
]

log = logging.getLogger(__name__)

SEND_CHUNK = 256 * 1024
"""The largest DATA payload the client sends (well under ``MAX_PAYLOAD``)."""
XFER_MIN = 64 * 1024
"""Pieces smaller than this go inline in DATA frames; larger ones through the window."""
READ_SIZE = 256 * 1024
STREAM_LIMIT = 1 << 20
"""Buffer limit of the streams :meth:`AgentClient.connect_unix` opens."""

REBUILD_HINT = (
    "the image's agent and this host speak different session versions: "
    "rebuild the image (`warden image build`)"
)
"""How an error about the session version ends."""

CALL_TIMEOUT_S = 30.0
"""The deadline of a quick call (ping, info, stat, list, remove, mkdir, shutdown) and of a send."""
PING_INTERVAL_S = 5.0
"""How often the watchdog pings the agent while requests are pending."""
PING_TIMEOUT_S = 10.0
"""How long the watchdog waits for the answer to its ping."""
DEFAULT_MAX_OUTPUT = 16 << 20
"""What :meth:`AgentClient.exec` collects of each stream by default (16 MiB)."""
GRANT_AT = INITIAL_WINDOW // 2
MAX_SEND_CREDIT = 64 << 20
"""The most credit an agent may grant the client (a link's end; more is a protocol error)."""
"""Consumed bytes of a stream that the client gathers before it grants them back as credit."""
LATE_ANSWER_GRACE_S = 0.5
"""How long the client still waits for an answer after its deadline passed (see _answer_within)."""
CLOSE_GRACE_S = 1.0
"""How long a closing connection may take to flush before it is cut."""

OutputCallback = Callable[[bytes], object]
"""Called with each chunk of output; if it returns an awaitable, that is awaited."""
BrokenCallback = Callable[[WardenError], object]
"""Called once with the reason when the connection is lost or aborted (not on close())."""

_OUTPUT_CHANNELS: dict[str, tuple[Channel, ...]] = {
    Op.EXEC: (Channel.STDOUT, Channel.STDERR),
    Op.READ: (Channel.FILE,),
    Op.LINK_OPEN: (Channel.STDOUT,),
}
"""The streams the agent may send for each op; DATA on any other is a protocol error."""
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""A name the guest takes as its hostname: one DNS label (the guest checks it as well)."""
_QUICK_OPS = frozenset({Op.PING, Op.INFO, Op.STAT, Op.LIST, Op.REMOVE, Op.MKDIR, Op.SHUTDOWN})


@dataclass(frozen=True)
class ExecResult:
    """How a command ended, and what it wrote (at most ``max_output`` bytes of each stream)."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool = False
    """Whether stdout or stderr was cut at ``max_output`` (the callbacks saw all of it)."""


@dataclass(frozen=True)
class EntryInfo:
    """A file system entry in the guest (``lstat``: symlinks are not followed)."""

    name: str
    path: str
    type: str
    """``"file"``, ``"dir"``, ``"symlink"`` or ``"other"``."""
    size: int
    mode: int
    """Permission bits, e.g. ``0o644``."""
    mtime: float

    @classmethod
    def from_json(cls, obj: object) -> EntryInfo:
        if not isinstance(obj, dict):
            raise ProtocolError(f"the guest agent sent a malformed entry: {obj!r:.200}")
        try:
            return cls(
                name=str(obj[Key.NAME]),
                path=str(obj[Key.PATH]),
                type=str(obj[Key.TYPE]),
                size=int(obj[Key.SIZE]),
                mode=int(obj[Key.MODE]),
                mtime=float(obj[Key.MTIME]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"the guest agent sent a malformed entry: {obj!r:.200}") from exc


class _ConnectionLostError(AgentError):
    """The connection to the agent broke while requests were pending."""


_Item = Frame | dict[str, Any] | WardenError
"""What a request's queue holds: DATA frames, the decoded RESPONSE, or the failure."""


class _Request:
    """One request on the connection: the frames the agent sends for it, and a way to answer.

    Its queue is bounded by the flow-control credit: DATA frames (the agent may send at most
    the credit of each of the op's streams; empty ones are dropped), one RESPONSE, one failure.
    """

    def __init__(self, client: AgentClient, request_id: int, op: str) -> None:
        self.client = client
        self.id = request_id
        self.op = op
        self.done = False
        self.answered = False
        """The RESPONSE (or a failure) was delivered: no more credit is worth granting."""
        self._cancel_sent = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        channels = _OUTPUT_CHANNELS.get(op, ())
        self.credit: dict[Channel, int] = dict.fromkeys(channels, INITIAL_WINDOW)
        """What the agent may still send on each stream."""
        self._ungranted: dict[Channel, int] = dict.fromkeys(channels, 0)
        self._ended: set[Channel] = set()
        self.send_credit = 0
        """What the client may still send on STDIN: granted by the agent's WINDOW frames,
        which only a link's end sends (``warden.guest.link``)."""
        self.send_granted = asyncio.Event()

    # -- fed by the reader task

    def accept(self, frame: Frame) -> str | None:
        """Take a DATA or EOF frame from the agent; return what is wrong with it, if anything."""
        channel = frame.channel
        if channel not in self.credit:
            return f"{frame.type.name} on the {channel.name} stream of a {self.op} request"
        if channel in self._ended:
            return f"{frame.type.name} after the end of the {channel.name} stream"
        if frame.type == FrameType.EOF:
            self._ended.add(channel)
            return None
        size = len(frame.payload)
        if size > self.credit[channel]:
            return (
                f"{size} bytes on the {channel.name} stream of request {self.id}, beyond "
                f"its flow-control credit of {self.credit[channel]}"
            )
        self.credit[channel] -= size
        if size:
            self._queue.put_nowait(frame)
        return None

    def grant(self, increment: int) -> str | None:
        """A WINDOW frame from the agent (a link's end): more STDIN credit."""
        if self.send_credit + increment > MAX_SEND_CREDIT:
            return f"the agent granted more than {MAX_SEND_CREDIT} bytes"
        self.send_credit += increment
        self.send_granted.set()
        return None

    def put_piece(self, frame: Frame) -> None:
        """A piece of a file read in the transfer window (checked; one per lent slot)."""
        self._queue.put_nowait(frame)

    def deliver(self, item: dict[str, Any] | WardenError) -> None:
        """The RESPONSE, or the failure of the connection."""
        self.answered = True
        self._queue.put_nowait(item)
        self.send_granted.set()  # wakes a link's sender: nothing more will be granted

    # -- used by the operation

    def has_news(self) -> bool:
        """Something (a response, a failure) arrived and is not consumed yet."""
        return not self._queue.empty()

    async def next(self) -> Frame | dict[str, Any]:
        """The next DATA frame, or the (successful) response dict, which ends the request.

        Raises the mapped error of an unsuccessful response, or of a broken connection. The
        caller calls :meth:`consumed` once it took a DATA frame's bytes.
        """
        item = await self._queue.get()
        if isinstance(item, WardenError):
            self.done = True
            raise item
        if isinstance(item, dict):
            self.done = True
            return self._check(item)
        return item

    def consumed(self, frame: Frame) -> None:
        """The consumer took ``frame``'s data: grant the agent more credit."""
        if self.answered:
            return
        size = len(frame.payload)
        channel = frame.channel
        ungranted = self._ungranted[channel] + size
        if ungranted < GRANT_AT:
            self._ungranted[channel] = ungranted
            return
        self._ungranted[channel] = 0
        self.credit[channel] += ungranted
        self.client._send_nowait(encode_window(self.id, channel, ungranted))

    def discard(self) -> None:
        """The request is over: no more credit is worth granting."""
        self.answered = True

    async def response(self) -> dict[str, Any]:
        """Skip any stream frames and return the successful response."""
        while True:
            item = await self.next()
            if isinstance(item, dict):
                return item
            self.consumed(item)

    async def send_data(self, channel: Channel, data: bytes | memoryview) -> None:
        await self.client._send(encode_header(FrameType.DATA, self.id, channel, len(data)) + data)

    async def send_eof(self, channel: Channel) -> None:
        await self.client._send(encode_header(FrameType.EOF, self.id, channel, 0))

    def cancel(self) -> None:
        """Ask the agent to abandon the request (kills an exec's process group)."""
        if not self.done and not self._cancel_sent:
            self._cancel_sent = True
            self.client._send_nowait(encode_header(FrameType.CANCEL, self.id, Channel.CONTROL, 0))

    def _check(self, response: dict[str, Any]) -> dict[str, Any]:
        if response.get(Key.OK) is True:
            return response
        kind = response.get(Key.ERROR)
        message = response.get(Key.MESSAGE)
        if kind == ErrorKind.FILE:
            errno = response.get(Key.ERRNO)
            strerror = response.get(Key.STRERROR) or message
            path = response.get(Key.PATH)
            raise GuestFileError(
                errno if isinstance(errno, int) else None,
                f"{self.op} failed in the guest: {strerror!s:.1000}",
                f"{path!s:.4096}" if path is not None else None,
            )
        raise AgentError(
            f"{self.op} failed in {self.client.who} ({kind!s:.100}): {message!s:.1000}"
        )


async def _chunks(
    data: bytes | bytearray | memoryview | AsyncIterable[bytes],
    size: int = SEND_CHUNK,
) -> AsyncIterator[memoryview]:
    """Split bytes, or the pieces of an async iterable, into views of ``size`` bytes.

    Small pieces of an iterable are gathered up to ``size``, so a stream read in small
    chunks still fills whole transfer-window slots.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), size):
            yield view[start : start + size]
        return
    pending = bytearray()
    async for piece in data:
        view = memoryview(piece).cast("B")
        if not pending and len(view) >= size:
            cut = len(view) - len(view) % size
            for start in range(0, cut, size):
                yield view[start : start + size]
            view = view[cut:]
        pending += view
        while len(pending) >= size:
            yield memoryview(bytes(pending[:size]))
            del pending[:size]
    if pending:
        yield memoryview(bytes(pending))


class _XferWindow:
    """The host's side of the transfer window: a file that backs the guest's XFER disk.

    It is cut into equal slots. A slot is taken, written with pwrite, referenced in an XFER
    frame of one request, and given back when the guest acknowledges exactly that reference
    (offset, length) on that request. Nothing else frees a slot.
    """

    def __init__(
        self,
        path: Path,
        slots: int,
        slot_size: int,
        auth: WindowAuth | None = None,
        read_auth: WindowAuth | None = None,
    ) -> None:
        self.slot_size = slot_size
        self.slots = slots
        self.auth = auth
        """Tags each piece (on the encrypted channel; see ``warden.channel.window``)."""
        self._sequence = 0
        """Pieces referenced so far in this session: the sequence number of the next one."""
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        if slots < 1 or slots * slot_size > size:
            os.close(self.fd)
            raise ValueError(
                f"the transfer window {path} holds {size} bytes, not {slots} slots of {slot_size}"
            )
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self._outstanding: dict[int, tuple[int, int]] = {}
        """offset -> (request id, length) of every reference the guest has not acknowledged."""
        self._closed = asyncio.Event()
        for i in range(slots):
            self._free.put_nowait(i * slot_size)
        self.reads = ReadSlots(slots * slot_size, slot_size, read_auth, self._free.put_nowait)
        """The slots lent to file reads (guest -> host), and the pieces in them."""

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def _take(self) -> int | None:
        """A free slot's offset, or None once the window is closed."""
        if self._free.empty():
            get = asyncio.ensure_future(self._free.get())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not get.done():
                    get.cancel()
            if not get.done() or get.cancelled():
                return None
            offset = get.result()
        else:
            offset = self._free.get_nowait()
        if self._closed.is_set():
            return None
        return offset

    async def put(self, request_id: int, data: memoryview) -> bytes | None:
        """Copy ``data`` into a free slot for a request; the reference to send, or None if the
        window closed meanwhile."""
        offset = await self._take()
        if offset is None:
            return None
        length = len(data)
        try:
            window_size = os.fstat(self.fd).st_size
            if not 0 < length <= self.slot_size or offset + length > window_size:
                raise ValueError(
                    f"a piece of {length} bytes at {offset} does not fit the transfer window "
                    f"({window_size} bytes, slots of {self.slot_size})"
                )
            os.pwrite(self.fd, data, offset)
        except BaseException:
            self._free.put_nowait(offset)
            raise
        self._outstanding[offset] = (request_id, length)
        return encode_xfer_ref(offset, length)

    def grab(self, count: int) -> list[int]:
        """Up to ``count`` free slots, taken at once (none if none is free), for a read: reads
        together hold at most all but ``FOR_WRITES`` slots."""
        count = min(count, self.slots - FOR_WRITES - self.reads.count)
        offsets: list[int] = []
        while len(offsets) < count and not self._free.empty() and not self._closed.is_set():
            offsets.append(self._free.get_nowait())
        return offsets

    def give_back(self, offsets: list[int]) -> None:
        """Slots from :meth:`grab` that were never lent after all."""
        for offset in offsets:
            self._free.put_nowait(offset)

    def tagged(self, request_id: int, reference: bytes, piece: memoryview) -> bytes:
        """``reference`` with the piece's tag, under the next sequence number. Call right
        before sending it, with no ``await`` in between: the agent counts pieces in the order
        their references arrive."""
        if self.auth is None:
            return reference
        sequence = self._sequence
        self._sequence += 1
        offset, length = decode_xfer_ref(reference)
        return encode_xfer_ref(offset, length, self.auth.tag(request_id, sequence, piece))

    def acknowledge(self, request_id: int, reference: bytes) -> str | None:
        """Free the slot of an acknowledged reference; what is wrong with it, if anything."""
        try:
            offset, length = decode_xfer_ref(reference)
        except FrameError as exc:
            return str(exc)
        if self._outstanding.get(offset) != (request_id, length):
            return (
                f"a transfer window acknowledgement of {length} bytes at offset {offset} on "
                f"request {request_id}, which is not outstanding for that request"
            )
        del self._outstanding[offset]
        self._free.put_nowait(offset)
        return None

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            with contextlib.suppress(OSError):
                os.close(self.fd)


class _Collector:
    """What exec keeps of one stream: at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(0, room)]
        self.data += chunk


async def _emit(callback: OutputCallback | None, data: bytes) -> None:
    if callback is not None:
        outcome = callback(data)
        if inspect.isawaitable(outcome):
            await outcome


def _user_arg(user: str) -> str:
    if user not in USERS:
        raise SpecError(f"user must be one of {', '.join(map(repr, USERS))}, not {user!r:.100}")
    return user


async def _answer_within(request: _Request, seconds: float) -> dict[str, Any] | None:
    """The request's response, or None if it did not come within ``seconds``.

    A moment of grace follows the deadline: if the host's own event loop was blocked (a slow
    synchronous output callback), the answer may be waiting unread in the socket.
    """
    for wait in (seconds, LATE_ANSWER_GRACE_S):
        scope = asyncio.timeout(wait)
        try:
            async with scope:
                return await request.response()
        except TimeoutError:
            if not scope.expired():
                raise
    return None


RESYNC_AFTER_S = 2.0
"""How long a host that takes over from another waits for the agent's answer before it pads."""


@dataclass(frozen=True)
class Deadlines:
    """How long the client waits for the agent (seconds); see the module's docstring."""

    call: float = CALL_TIMEOUT_S
    ping_interval: float = PING_INTERVAL_S
    ping: float = PING_TIMEOUT_S


class AgentClient:
    """A connection to one guest agent. Make one with :meth:`connect_unix`/:meth:`from_streams`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str | None = None,
        on_broken: BrokenCallback | None = None,
        deadlines: Deadlines | None = None,
        secret: bytes | None = None,
        rekey: bytes | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._name = name
        self._layer = ChannelLayer(secret, self.who) if secret is not None else None
        """The encrypted channel under the frames (None: plaintext, a local test agent's)."""
        self._rekey = rekey
        # Plaintext: skip a stale tail until the agent's HELLO (the channel hunts itself).
        self._decoder = FrameDecoder(hunt=self._layer is None)
        self._nonce = os.urandom(16).hex()
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._closed_by: WardenError | None = None
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._xfer: _XferWindow | None = None
        self._window_key = os.urandom(WINDOW_KEY_SIZE) if self._layer is not None else None
        self._on_broken = on_broken
        self._deadlines = deadlines or Deadlines()
        self._established = False
        self._shutting_down = False
        self._busy = 0  # requests the watchdog watches over
        self._busy_event = asyncio.Event()
        self.gate: IdleGate | None = None
        """Every request passes it: it continues an idle-stopped VM first (``vmm/idle.py``)."""
        self._clock_task: asyncio.Task[None] | None = None
        self.session_version = 0
        """The session version the agent chose: SESSION_VERSION, once connected."""
        self.agent_hello: dict[str, Any] = {}
        """The agent's HELLO: ``version``, ``agent`` and ``pid``."""

    @property
    def name(self) -> str | None:
        """The VM this connection belongs to, as named in error messages."""
        return self._name

    @property
    def who(self) -> str:
        """The agent, as error messages call it."""
        return f"the guest agent of VM {self._name}" if self._name else "the guest agent"

    # -- connecting

    @classmethod
    async def connect_unix(
        cls,
        path: str | Path,
        *,
        timeout: float,
        resync: bool = False,
        name: str | None = None,
        on_broken: BrokenCallback | None = None,
        deadlines: Deadlines | None = None,
        secret: bytes | None = None,
        rekey: bytes | None = None,
    ) -> AgentClient:
        """Connect to the agent's unix socket (retrying until it exists) and say HELLO.

        ``resync``: take over from an earlier host that may have died mid-frame (a manager
        restarted after kill -9); see ``RESYNC_PADDING_SIZE`` in :mod:`warden.wire.frame`.
        ``name`` (the VM's id) appears in error messages and, if it is a DNS label, becomes
        the guest's hostname; ``on_broken(error)`` is called once
        if the connection is later lost, or aborted for a protocol violation or an unresponsive
        agent. Raises :class:`~warden.AgentTimeoutError` if both do not happen within
        ``timeout``.

        ``secret``: the VM's 32-byte channel secret; the frames then run inside the encrypted
        channel (:mod:`warden.agent.secure`), and ``rekey`` (32 bytes), if given, replaces the
        secret in the agent for every later handshake (a VM restored from a snapshot). Without
        a secret the stream is plaintext frames (a local test agent's).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() >= deadline:
                    vm = f" of VM {name}" if name else ""
                    raise AgentTimeoutError(
                        f"could not connect to the guest agent socket{vm} {path} within "
                        f"{timeout:g}s: {exc}"
                    ) from None
                await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        return await cls.from_streams(
            reader,
            writer,
            timeout=max(0.0, deadline - loop.time()),
            resync=resync,
            name=name,
            on_broken=on_broken,
            deadlines=deadlines,
            secret=secret,
            rekey=rekey,
        )

    @classmethod
    async def from_streams(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float,
        resync: bool = False,
        name: str | None = None,
        on_broken: BrokenCallback | None = None,
        deadlines: Deadlines | None = None,
        secret: bytes | None = None,
        rekey: bytes | None = None,
    ) -> AgentClient:
        """Say HELLO over an open stream pair (see :meth:`connect_unix`). Raises
        AgentTimeoutError if no answer in time."""
        client = cls(
            reader,
            writer,
            name=name,
            on_broken=on_broken,
            deadlines=deadlines,
            secret=secret,
            rekey=rekey,
        )
        try:
            async with asyncio.timeout(timeout):
                await client._handshake(resync=resync)
        except TimeoutError:
            await client.close()
            raise AgentTimeoutError(client._silence_message(timeout)) from None
        except BaseException:
            await client.close()
            raise
        return client

    def _silence_message(self, timeout: float) -> str:
        if self._layer is not None and not self._layer.established:
            return (
                f"{self.who} did not answer the channel handshake within {timeout:g}s. An "
                "agent from an image built before the encrypted channel never answers it: "
                "rebuild the image (`warden image build`) if it is older than this warden"
            )
        return f"{self.who} did not answer HELLO within {timeout:g}s"

    def _hello_payload(self) -> dict[str, Any]:
        # A fresh seed and the time with every HELLO: a VM restored from a boot snapshot
        # must not share its RNG state or its clock with its siblings. The nonce comes back in
        # the agent's answer, which tells it apart from an answer to an earlier host.
        hello: dict[str, Any] = {
            Key.VERSIONS: [SESSION_VERSION],
            Key.NONCE: self._nonce,
            Key.SEED: os.urandom(32).hex(),
            Key.TIME: time.time(),
        }
        if self._name is not None and _HOSTNAME_RE.match(self._name):
            hello[Key.HOSTNAME] = self._name  # a clone is a new machine: its own hostname
        if self._window_key is not None:
            hello[Key.XFER_KEY] = self._window_key.hex()
        if self._rekey is not None:
            hello[Key.REKEY] = self._rekey.hex()
        return hello

    async def _handshake(self, *, resync: bool) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name="warden-agent-reader")
        if self._layer is not None:
            self._writer.write(self._layer.opening(resync=resync))
            await self._layer.ready
            resync = False  # the channel resynchronised the stream
        hello = self._hello_payload()
        await self._send(encode_json(FrameType.HELLO, 0, hello))
        if resync:
            try:
                await asyncio.wait_for(asyncio.shield(self._hello), RESYNC_AFTER_S)
            except TimeoutError:
                # The agent may have taken our HELLO for the rest of a frame that an earlier
                # host left half-sent: complete any such frame (the agent then hunts past the
                # padding for a HELLO), and say HELLO again. Under a new nonce: if the agent was
                # only slow, it answers the first HELLO, then reports the padding as a protocol
                # error and hunts for the second; only the answer to the second counts.
                self._nonce = os.urandom(16).hex()
                again = encode_json(FrameType.HELLO, 0, {**hello, Key.NONCE: self._nonce})
                await self._send(bytes(RESYNC_PADDING_SIZE) + again)
        reply = await self._hello
        version = reply.get(Key.VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version != SESSION_VERSION:
            error = ProtocolError(
                f"{self.who} chose session version {version!r:.50}, which the host did not "
                f"offer ([{SESSION_VERSION}]); {REBUILD_HINT}"
            )
            self._abort(error)
            raise error
        if self._rekey is not None and reply.get(Key.REKEYED) is not True:
            error = ProtocolError(f"{self.who} did not take its new channel secret; {REBUILD_HINT}")
            self._abort(error)
            raise error
        self.session_version = version
        self.agent_hello = reply
        self._established = True
        self._watchdog_task = asyncio.create_task(self._watch(), name="warden-agent-watchdog")

    # -- the connection

    def enable_xfer(self, path: Path, *, slots: int, slot_size: int) -> bool:
        """Send large file writes through the transfer window backed by ``path``.

        Only if the agent found the window's disk (its HELLO says ``xfer``). Returns whether
        the window is in use.
        """
        if not 0 < slot_size <= XFER_MAX_LENGTH or slot_size % XFER_ALIGN:
            raise ValueError(
                f"slot_size must be a multiple of {XFER_ALIGN} up to {XFER_MAX_LENGTH}"
            )
        if self.agent_hello.get(Key.XFER) is not True or self._xfer is not None:
            return self._xfer is not None
        key = self._window_key
        auth = WindowAuth(key) if key is not None else None
        read_auth = WindowAuth(reads_key(key)) if key is not None else None
        self._xfer = _XferWindow(path, slots, slot_size, auth, read_auth)
        return True

    @property
    def xfer_enabled(self) -> bool:
        return self._xfer is not None

    @property
    def closed(self) -> bool:
        return self._closed_by is not None

    def _closed_error(self) -> WardenError:
        """A fresh exception saying why the connection is closed."""
        cause = self._closed_by
        if cause is None:
            return SandboxClosedError(f"the connection to {self.who} is closed")
        return type(cause)(*cause.args)

    async def _send(self, data: bytes) -> None:
        """Send ``data``; waits (at most ``Deadlines.call``) while the agent does not read."""
        if self._closed_by is not None:
            raise self._closed_error()
        timeout = self._deadlines.call
        scope = asyncio.timeout(timeout)
        try:
            self._writer.write(self._sealed(data))
            if self._writer.transport.get_write_buffer_size():
                async with scope:
                    await self._writer.drain()
        except TimeoutError:
            if not scope.expired():
                raise
            raise self._unresponsive(f"stopped reading its channel for {timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            self._abort(_ConnectionLostError(f"the connection to {self.who} broke: {exc}"))
            raise self._closed_error() from exc

    def _send_nowait(self, data: bytes) -> None:
        if self._closed_by is None and not self._writer.is_closing():
            self._writer.write(self._sealed(data))

    def _sealed(self, frames: bytes) -> bytes:
        """``frames`` as they go on the wire: in records of the channel, if there is one."""
        return frames if self._layer is None else self._layer.seal(frames)

    def _unresponsive(self, what: str) -> AgentUnresponsiveError:
        """End the connection because the agent ``what``; the error to raise."""
        vm = f" {self._name}" if self._name else ""
        error = AgentUnresponsiveError(
            f"{self.who} {what}: it is frozen or overloaded, and its connection was closed. "
            f"Stop and remove the VM{vm}; a new one starts clean"
        )
        self._abort(error, hard=True)
        return AgentUnresponsiveError(*error.args)

    def _protocol_error(self, problem: str) -> None:
        """Tell the agent (ERROR on request 0) and close, failing everything with ProtocolError."""
        vm = f" {self._name}" if self._name else ""
        message = (
            f"{self.who} broke the protocol ({problem}); the connection was closed. The guest "
            f"cannot be trusted any more: stop and remove the VM{vm}"
        )
        with contextlib.suppress(FrameError):
            report = {Key.ERROR: ErrorKind.PROTOCOL, Key.MESSAGE: problem[:1000]}
            self._send_nowait(encode_json(FrameType.ERROR, 0, report))
        self._abort(ProtocolError(message))

    def _abort(self, error: WardenError, *, hard: bool = False) -> None:
        """Close the connection and fail every pending request with (a copy of) ``error``.

        ``hard``: drop what is still unsent instead of flushing it (the agent does not read).
        """
        if self._closed_by is not None:
            return
        self._closed_by = error
        if self._xfer is not None:
            self._xfer.close()
        if self._layer is not None:
            self._layer.fail(type(error)(*error.args))
        if not self._hello.done():
            self._hello.set_exception(type(error)(*error.args))
            self._hello.exception()  # mark it retrieved: the handshake may have given up already
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            request.deliver(type(error)(*error.args))
        transport = self._writer.transport
        if hard:
            transport.abort()
        else:
            self._writer.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)
        for task in (self._reader_task, self._watchdog_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._report_broken(error)

    def _report_broken(self, error: WardenError) -> None:
        """Tell ``on_broken`` once, unless the host closed the connection on purpose."""
        callback, self._on_broken = self._on_broken, None
        if callback is None or not self._established or isinstance(error, SandboxClosedError):
            return
        if self._shutting_down and isinstance(error, _ConnectionLostError):
            return  # the guest powered off, as asked
        try:
            callback(type(error)(*error.args))
        except Exception:  # a broken callback must not break the client's cleanup
            log.exception("the on_broken callback of %s failed", self.who)

    # -- the reader

    async def _read_loop(self) -> None:
        try:
            while self._closed_by is None:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    self._abort(_ConnectionLostError(f"{self.who} closed the connection"))
                    return
                if self._layer is not None:
                    try:
                        data = self._layer.open(data)
                    except ChannelAuthError as exc:
                        self._abort(exc)
                        return
                error = self._feed(data)
                while error is not None and not self._hello.done() and self._closed_by is None:
                    self._decoder.resync()  # not the agent's answer yet: hunt on
                    error = self._feed(b"")
                if error is not None and self._closed_by is None:
                    self._protocol_error(str(error))
        except (ConnectionError, OSError) as exc:
            self._abort(_ConnectionLostError(f"the connection to {self.who} broke: {exc}"))

    def _feed(self, data: bytes) -> FrameError | None:
        """Act on the frames in ``data``; return the error that stopped decoding, if any."""
        error: FrameError | None = None
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            frames, error = exc.frames, exc  # still act on the good frames before it
        try:
            for frame in frames:
                if self._closed_by is not None:
                    break
                if self._hello.done():
                    self._dispatch(frame)
                else:
                    self._greeting(frame)
        except FrameError as exc:
            error = exc
        return error

    def _greeting(self, frame: Frame) -> None:
        """Before the agent's answer to our HELLO: everything else is stale, from an earlier
        host's session (an answer or an error carries the nonce of the HELLO it answers)."""
        if frame.request_id != 0 or frame.type not in (FrameType.HELLO, FrameType.ERROR):
            return
        try:
            reply = decode_json(frame)
        except FrameError:
            return  # stale bytes that looked like a HELLO
        if reply.get(Key.NONCE) != self._nonce:
            return
        if frame.type == FrameType.HELLO:
            self._hello.set_result(reply)
        else:  # an agent that does not speak SESSION_VERSION (one of an older image)
            message = reply.get(Key.MESSAGE, reply)
            self._abort(
                ProtocolError(f"{self.who} refused the HELLO: {message!s:.1000}; {REBUILD_HINT}")
            )

    def _dispatch(self, frame: Frame) -> None:
        """Route one frame from the agent. Raises FrameError on a malformed or forbidden one."""
        ftype, rid = frame.type, frame.request_id
        if rid == 0:
            if ftype != FrameType.ERROR:
                raise FrameError(f"unexpected {ftype.name} frame on request 0")
            report = decode_json(frame)
            self._abort(
                ProtocolError(
                    f"{self.who} reported a protocol error and dropped the connection: "
                    f"{report.get(Key.MESSAGE, report)!s:.1000}"
                )
            )
            return
        if ftype == FrameType.DATA and frame.channel in (Channel.XFER, Channel.XFER_READ):
            self._window_frame(frame)
            return
        if ftype == FrameType.WINDOW:
            self._granted(frame)
            return
        if ftype not in (FrameType.DATA, FrameType.EOF, FrameType.RESPONSE):
            raise FrameError(f"unexpected {ftype.name} frame from the agent")
        response = decode_json(frame) if ftype == FrameType.RESPONSE else None
        if response is not None and self._xfer is not None:
            self._xfer.reads.answered(rid)  # the agent writes no more into this read's slots
        request = self._requests.get(rid)
        if request is None:
            return  # a request the caller abandoned (cancelled); its late frames are dropped
        if response is not None:
            del self._requests[rid]
            request.deliver(response)
            return
        problem = request.accept(frame)
        if problem is not None:
            raise FrameError(problem)

    def _granted(self, frame: Frame) -> None:
        """A WINDOW frame from the agent: credit for what the client sends a link's end."""
        request = self._requests.get(frame.request_id)
        if request is None:
            return  # a link's end that already ended (its last grants may trail its answer)
        if request.op != Op.LINK_OPEN or frame.channel != Channel.STDIN:
            raise FrameError(
                f"unexpected WINDOW frame from the agent on the {frame.channel.name} stream of "
                f"a {request.op} request"
            )
        problem = request.grant(decode_window(frame.payload))
        if problem is not None:
            raise FrameError(problem)

    def _window_frame(self, frame: Frame) -> None:
        """An acknowledgement of a write's piece (XFER), or a reference to a piece of a file
        read (XFER_READ), in the transfer window."""
        if self._xfer is None:
            raise FrameError("a transfer window reference, but no window is open")
        if frame.channel == Channel.XFER:
            problem = self._xfer.acknowledge(frame.request_id, frame.payload)
            if problem is not None:
                raise FrameError(problem)
            return
        problem = self._xfer.reads.accept(frame.request_id, frame.payload)[1]
        if problem is not None:
            raise FrameError(problem)
        request = self._requests.get(frame.request_id)
        if request is not None:  # else the consumer left, and the slot is free again
            request.put_piece(frame)

    # -- requests

    @contextlib.asynccontextmanager
    async def _request(
        self, args: dict[str, Any], *, watched: bool = True
    ) -> AsyncIterator[_Request]:
        """Send a REQUEST and yield its stream; CANCEL it if the caller leaves early.

        ``watched``: the watchdog pings the agent while the request is pending (all but its
        own pings, which are sent without waiting for the agent to read).
        """
        if self._closed_by is not None:
            raise self._closed_error()
        gate = self.gate
        if gate is not None:
            await gate.enter()
        rid = self._next_id
        self._next_id = rid + 1 if rid < MAX_REQUEST_ID else 1
        request = _Request(self, rid, str(args[Key.OP]))
        self._requests[rid] = request
        if watched:
            self._busy += 1
            self._busy_event.set()
        try:
            frame = encode_json(FrameType.REQUEST, rid, args)
            if watched:
                await self._send(frame)
            else:
                self._send_nowait(frame)
            yield request
        except BaseException:
            request.cancel()
            raise
        finally:
            self._requests.pop(rid, None)
            request.discard()
            if watched:
                self._busy -= 1
                if not self._busy:
                    self._busy_event.clear()
            if gate is not None:
                gate.leave()

    async def _call(self, args: dict[str, Any]) -> dict[str, Any]:
        """A quick request: its response must come within ``Deadlines.call``."""
        timeout = self._deadlines.call
        async with self._request(args) as request:
            response = await _answer_within(request, timeout)
            if response is None:
                raise self._unresponsive(
                    f"did not answer a {request.op} request within {timeout:g}s"
                )
        return response

    async def _watch(self) -> None:
        """While requests are pending, ping the agent every ``ping_interval`` seconds."""
        while self._closed_by is None:
            await self._busy_event.wait()
            await asyncio.sleep(self._deadlines.ping_interval)
            if self._busy and self._closed_by is None:
                await self._probe()

    async def _probe(self) -> None:
        """One liveness ping; ends the connection if no answer comes within its deadline."""
        timeout = self._deadlines.ping
        try:
            async with self._request({Key.OP: Op.PING}, watched=False) as request:
                if await _answer_within(request, timeout) is None:
                    raise self._unresponsive(f"did not answer a liveness ping within {timeout:g}s")
        except WardenError:
            return  # the connection ended (this ping's failure ended it, or something else)

    def send_time(self) -> None:
        """Send the host's time now, ahead of any request sent after it (the agent reads
        requests in order and sets its clock first): a VM that was stopped has a clock that
        stood still. Not gated, not waited for; its answer is read in the background."""
        if self._closed_by is not None or self._writer.is_closing():
            return
        rid = self._next_id
        self._next_id = rid + 1 if rid < MAX_REQUEST_ID else 1
        request = _Request(self, rid, Op.PING)
        self._requests[rid] = request
        self._send_nowait(
            encode_json(FrameType.REQUEST, rid, {Key.OP: Op.PING, Key.TIME: time.time()})
        )
        self._clock_task = asyncio.create_task(self._time_answer(request), name="warden-time")

    async def _time_answer(self, request: _Request) -> None:
        try:
            with contextlib.suppress(WardenError):
                await _answer_within(request, self._deadlines.ping)
        finally:
            self._requests.pop(request.id, None)
            request.discard()

    # -- operations

    async def ping(self) -> float:
        """Round-trip time of a no-op request, in seconds."""
        start = time.perf_counter()
        await self._call({Key.OP: Op.PING})
        return time.perf_counter() - start

    async def info(self) -> dict[str, object]:
        """Kernel release, uptime, memory, agent version and pid of the guest."""
        response = await self._call({Key.OP: Op.INFO})
        response.pop(Key.OK, None)
        return response

    async def exec(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | AsyncIterable[bytes] | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        user: str = DEFAULT_USER,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run a command in the guest as ``user`` (``"user"`` or ``"root"``) and wait for it.

        A string runs under ``/bin/sh -c``; a list is an argv. Output is streamed to the
        callbacks as it arrives (an async callback is awaited before more output is read), and
        at most ``max_output`` bytes of each stream are also collected in the result
        (``truncated`` says if some were not). A command that cannot be started gives exit code
        127 (126 if not executable), like a shell. Raises :class:`~warden.CommandTimeoutError`
        (with ``.result``) when ``timeout`` passes. Cancelling the call kills the command's
        process group.
        """
        if max_output < 0:
            raise SpecError(f"max_output must be 0 or more bytes, not {max_output}")
        args = _exec_args(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, user=user)
        outputs = {
            Channel.STDOUT: (_Collector(max_output), on_stdout),
            Channel.STDERR: (_Collector(max_output), on_stderr),
        }
        async with self._request(args) as request:
            response = await self._pump_with_stdin(request, stdin, outputs)
        (out, _), (err, _) = outputs[Channel.STDOUT], outputs[Channel.STDERR]
        result = ExecResult(
            exit_code=_opt_int(response.get(Key.EXIT_CODE)),
            signal=_opt_int(response.get(Key.SIGNAL)),
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            timed_out=response.get(Key.TIMED_OUT) is True,
            truncated=out.truncated or err.truncated,
        )
        if result.timed_out:
            error = CommandTimeoutError(
                f"the command ran longer than its timeout={timeout}s and was killed; pass a "
                f"larger timeout= (or timeout=None) to let it run longer: {cmd!r:.200}"
            )
            error.result = result  # the partial output, for the caller
            raise error
        return result

    async def _pump_with_stdin(
        self,
        request: _Request,
        stdin: bytes | AsyncIterable[bytes] | None,
        outputs: dict[Channel, tuple[_Collector, OutputCallback | None]],
    ) -> dict[str, Any]:
        """Feed ``stdin`` (if any) while the output is pumped; the response that ends it."""
        feeder = None
        if stdin is not None:
            feeder = asyncio.create_task(self._feed_stdin(request, stdin))
        try:
            response = await _pump_output(request, outputs)
        finally:
            feeder_error = None
            if feeder is not None:
                feeder.cancel()
                await asyncio.wait([feeder])
                if not feeder.cancelled():
                    feeder_error = feeder.exception()
        if feeder_error is not None:
            raise feeder_error  # the stdin source failed, so the command was cancelled
        return response

    async def _feed_stdin(self, request: _Request, stdin: bytes | AsyncIterable[bytes]) -> None:
        try:
            async for chunk in _chunks(stdin):
                await request.send_data(Channel.STDIN, chunk)
            await request.send_eof(Channel.STDIN)
        except asyncio.CancelledError:
            raise
        except BaseException:
            request.cancel()  # the process would wait for the rest of its stdin forever
            raise

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        parents: bool = True,
        user: str = DEFAULT_USER,
    ) -> int:
        """Write a file in the guest atomically (temp file + rename) as ``user``. Returns its
        size."""
        args = {
            Key.OP: Op.WRITE,
            Key.PATH: path,
            Key.MODE: mode,
            Key.PARENTS: parents,
            Key.USER: _user_arg(user),
        }
        xfer = self._xfer
        async with self._request(args) as request:
            async for chunk in _chunks(data, xfer.slot_size if xfer else SEND_CHUNK):
                if request.has_news():
                    break  # the agent refused early (e.g. a missing dir): stop sending
                if xfer is not None and len(chunk) >= XFER_MIN:
                    reference = await xfer.put(request.id, chunk)
                    if reference is None:
                        raise SandboxClosedError(
                            f"the connection to {self.who} closed during a file transfer: "
                            f"{self._closed_error()}"
                        )
                    tagged = xfer.tagged(request.id, reference, chunk)
                    await request.send_data(Channel.XFER, tagged)
                else:
                    await request.send_data(Channel.FILE, chunk)
            else:
                await request.send_eof(Channel.FILE)
            response = await request.response()
        return self._size(response, Key.SIZE)

    async def read_file(self, path: str, *, user: str = DEFAULT_USER) -> AsyncIterator[bytes]:
        """Stream a file from the guest in chunks, read as ``user``. Leaving the loop early
        cancels the read. The agent may send the next chunks only as the caller takes these.

        Through the transfer window where the agent can (``xfer_read`` in its HELLO) and a
        slot is free: the agent writes pieces of up to a slot into slots lent to this read
        (:mod:`warden.agent.xferread`), and each is checked before it is handed on."""
        args: dict[str, Any] = {Key.OP: Op.READ, Key.PATH: path, Key.USER: _user_arg(user)}
        xfer = self._xfer if self.agent_hello.get(Key.XFER_READ) is True else None
        offsets = xfer.grab(READ_SLOTS) if xfer is not None else []
        if offsets:
            args[Key.XFER] = True
        try:
            async with self._request(args) as request:
                if xfer is not None and offsets:
                    lent = [xfer.reads.lend(request.id, offset) for offset in offsets]
                    offsets = []
                    self._send_nowait(b"".join(_xfer_read_frame(request.id, r) for r in lent))
                async with contextlib.aclosing(self._read_chunks(request, xfer)) as chunks:
                    async for chunk in chunks:
                        yield chunk
        finally:
            if xfer is not None:
                xfer.give_back(offsets)

    async def _read_chunks(
        self, request: _Request, xfer: _XferWindow | None
    ) -> AsyncGenerator[bytes, None]:
        """The chunks of a read: DATA, and pieces in the window (each checked, and its slot
        lent again once the caller took it)."""
        try:
            while True:
                item = await request.next()
                if isinstance(item, dict):
                    return
                if item.channel != Channel.XFER_READ or xfer is None:
                    yield item.payload
                    request.consumed(item)
                    continue
                if self._closed_by is not None:  # the window file is closed
                    raise self._closed_error()
                offset = decode_xfer_ref(item.payload)[0]
                try:
                    data = xfer.reads.take(xfer.fd, request.id, offset, self.who)
                except ChannelAuthError as exc:
                    self._abort(exc)
                    raise self._closed_error() from None
                yield data
                again = xfer.reads.after_take(request.id, offset)
                if again is not None:
                    self._send_nowait(_xfer_read_frame(request.id, again))
        finally:
            if xfer is not None:
                xfer.reads.abandoned(request.id)  # nothing, if every piece was taken

    async def read_file_bytes(self, path: str, *, user: str = DEFAULT_USER) -> bytes:
        """A whole file from the guest."""
        return b"".join([chunk async for chunk in self.read_file(path, user=user)])

    async def list_dir(self, path: str, *, user: str = DEFAULT_USER) -> list[EntryInfo]:
        response = await self._call({Key.OP: Op.LIST, Key.PATH: path, Key.USER: _user_arg(user)})
        entries = response.get(Key.ENTRIES)
        if not isinstance(entries, list):
            raise ProtocolError(f"{self.who} sent a list response without entries")
        return [EntryInfo.from_json(entry) for entry in entries]

    async def stat(self, path: str, *, user: str = DEFAULT_USER) -> EntryInfo:
        response = await self._call({Key.OP: Op.STAT, Key.PATH: path, Key.USER: _user_arg(user)})
        return EntryInfo.from_json(response.get(Key.ENTRY))

    async def remove(self, path: str, *, recursive: bool = False, user: str = DEFAULT_USER) -> None:
        args = {Key.OP: Op.REMOVE, Key.PATH: path, Key.RECURSIVE: recursive}
        await self._call({**args, Key.USER: _user_arg(user)})

    async def make_dir(
        self, path: str, *, parents: bool = True, mode: int = 0o755, user: str = DEFAULT_USER
    ) -> None:
        args = {Key.OP: Op.MKDIR, Key.PATH: path, Key.PARENTS: parents, Key.MODE: mode}
        await self._call({**args, Key.USER: _user_arg(user)})

    async def open_link(
        self, name: str, key: bytes, role: str, options: Mapping[str, object] | None = None
    ) -> LinkEnd:
        """Open this VM's end of link ``name`` (a request that lasts as long as the link):
        once the agent made the socket, or AgentError (nothing left open) if it refused.
        ``options``: the ring's (``Key.TRANSPORT``, ``Key.LINK_ID``, ``Key.PLAIN``)."""
        stack = contextlib.AsyncExitStack()
        args = {Key.OP: Op.LINK_OPEN, Key.NAME: name, Key.LINK_KEY: key.hex(), Key.ROLE: role}
        request = await stack.enter_async_context(self._request({**args, **(options or {})}))
        end = LinkEnd(self, request, stack)
        try:
            await end.opened(self._deadlines.call)
        except BaseException:
            await stack.aclose()
            raise
        return end

    async def close_link(self, name: str, reason: str) -> bool:
        """Ask the agent to close its end of link ``name``; whether one was open."""
        response = await self._call({Key.OP: Op.LINK_CLOSE, Key.NAME: name, Key.REASON: reason})
        return response.get(Key.CLOSED) is True

    async def shutdown(self) -> None:
        """Ask the agent to power the guest off; returns once it agreed (or hung up)."""
        self._shutting_down = True
        # The guest may go down before (or instead of) answering.
        with contextlib.suppress(_ConnectionLostError):
            await self._call({Key.OP: Op.SHUTDOWN})
        await self.close()

    async def close(self) -> None:
        """Close the connection. Pending requests fail with SandboxClosedError."""
        self._abort(SandboxClosedError(f"the connection to {self.who} was closed"))
        for task in (self._reader_task, self._watchdog_task):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait([task])
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()  # the agent did not take what was left to send

    def _size(self, response: dict[str, Any], key: str) -> int:
        value = response.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"{self.who} sent a response with a bad {key}: {value!r:.100}")
        return value

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _exec_args(
    cmd: list[str] | str,
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: object,
    timeout: float | None,
    user: str,
) -> dict[str, Any]:
    """The arguments of an exec REQUEST."""
    args: dict[str, Any] = {
        Key.OP: Op.EXEC,
        Key.STDIN: stdin is not None,
        Key.USER: _user_arg(user),
    }
    if isinstance(cmd, str):
        args[Key.SHELL] = cmd
    else:
        args[Key.ARGV] = list(cmd)
    if env is not None:
        args[Key.ENV] = dict(env)
    if cwd is not None:
        args[Key.CWD] = cwd
    if timeout is not None:
        args[Key.TIMEOUT] = timeout
    return args


async def _pump_output(
    request: _Request, outputs: dict[Channel, tuple[_Collector, OutputCallback | None]]
) -> dict[str, Any]:
    """Collect and hand on an exec's output until its response; credit flows back to the agent
    only once each chunk's callback returned."""
    while True:
        item = await request.next()
        if isinstance(item, dict):
            return item
        collector, callback = outputs[item.channel]  # accept() let only stdout and stderr in
        collector.add(item.payload)
        await _emit(callback, item.payload)
        request.consumed(item)


def _xfer_read_frame(request_id: int, reference: bytes) -> bytes:
    """A slot lent to a read: DATA on XFER_READ with the slot's reference."""
    return encode_header(FrameType.DATA, request_id, Channel.XFER_READ, len(reference)) + reference


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
