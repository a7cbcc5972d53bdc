"""The async host client of the guest agent.

One :class:`AgentClient` owns one byte stream to the agent (the unix socket QEMU serves for the
virtio-serial port, or any asyncio stream pair). A single reader task decodes frames and hands
each to the queue of the request it belongs to, so many requests and their streams interleave
on the connection::

    client = await AgentClient.connect_unix(vm_dir / "agent.sock", timeout=30)
    result = await client.exec(["uname", "-r"])
    await client.write_file("/root/x.txt", b"hello")

If the connection breaks, every pending request fails (:class:`~warden.ProtocolError` after a
malformed frame, :class:`~warden.AgentError` when the connection is lost,
:class:`~warden.SandboxClosedError` after :meth:`AgentClient.close`); no request waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden._errors import (
    AgentError,
    AgentTimeoutError,
    CommandTimeoutError,
    GuestFileError,
    ProtocolError,
    SandboxClosedError,
    WardenError,
)
from warden.wire.frame import (
    PROTOCOL_VERSION,
    RESYNC_PADDING_SIZE,
    XFER_MAX_LENGTH,
    Channel,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_json,
    decode_xfer_ref,
    encode_header,
    encode_json,
    encode_xfer_ref,
)

__all__ = ["AgentClient", "EntryInfo", "ExecResult", "OutputCallback"]

SEND_CHUNK = 256 * 1024
XFER_MIN = 64 * 1024
"""Pieces smaller than this go inline in DATA frames; larger ones through the window."""
"""The largest DATA payload the client sends (well under ``MAX_PAYLOAD``)."""
READ_SIZE = 256 * 1024
STREAM_LIMIT = 1 << 20
"""Buffer limit of the streams :meth:`AgentClient.connect_unix` opens."""

OutputCallback = Callable[[bytes], object]
"""Called with each chunk of output; if it returns an awaitable, that is awaited."""


@dataclass(frozen=True)
class ExecResult:
    """How a command ended, and everything it wrote."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool


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
            raise ProtocolError(f"the guest agent sent a malformed entry: {obj!r}")
        try:
            return cls(
                name=str(obj["name"]),
                path=str(obj["path"]),
                type=str(obj["type"]),
                size=int(obj["size"]),
                mode=int(obj["mode"]),
                mtime=float(obj["mtime"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the guest agent sent a malformed entry: {obj!r}") from exc


class _ConnectionLostError(AgentError):
    """The connection to the agent broke while requests were pending."""


_Item = Frame | dict[str, Any] | WardenError
"""What a request's queue holds: DATA/EOF frames, the decoded RESPONSE, or the failure."""


class _Request:
    """One request on the connection: the frames the agent sends for it, and a way to answer."""

    def __init__(self, client: AgentClient, request_id: int, op: str) -> None:
        self.client = client
        self.id = request_id
        self.op = op
        self.done = False
        self._cancel_sent = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()

    # -- fed by the reader task

    def deliver(self, item: _Item) -> None:
        self._queue.put_nowait(item)

    # -- used by the operation

    def has_news(self) -> bool:
        """Something (a response, a failure) arrived and is not consumed yet."""
        return not self._queue.empty()

    async def next(self) -> Frame | dict[str, Any]:
        """The next DATA/EOF frame, or the (successful) response dict, which ends the request.

        Raises the mapped error of an unsuccessful response, or of a broken connection.
        """
        item = await self._queue.get()
        if isinstance(item, WardenError):
            self.done = True
            raise item
        if isinstance(item, dict):
            self.done = True
            return self._check(item)
        return item

    async def response(self) -> dict[str, Any]:
        """Skip any stream frames and return the successful response."""
        while True:
            item = await self.next()
            if isinstance(item, dict):
                return item

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
        if response.get("ok") is True:
            return response
        kind = response.get("error")
        message = response.get("message")
        if kind == "file":
            errno = response.get("errno")
            strerror = response.get("strerror") or message
            path = response.get("path")
            raise GuestFileError(
                errno if isinstance(errno, int) else None,
                f"{self.op} failed in the guest: {strerror}",
                str(path) if path is not None else None,
            )
        raise AgentError(f"{self.op} failed in the guest agent ({kind}): {message}")


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
    frame, and given back when the guest acknowledges that reference.
    """

    def __init__(self, path: Path, slots: int, slot_size: int) -> None:
        self.slot_size = slot_size
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self._closed = asyncio.Event()
        for i in range(slots):
            self._free.put_nowait(i * slot_size)

    async def put(self, data: memoryview) -> bytes:
        """Copy ``data`` into a free slot; return the reference to send."""
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
                raise SandboxClosedError("the agent connection closed during a file transfer")
            offset = get.result()
        else:
            offset = self._free.get_nowait()
        if self._closed.is_set():
            raise SandboxClosedError("the agent connection closed during a file transfer")
        os.pwrite(self.fd, data, offset)
        return encode_xfer_ref(offset, len(data))

    def release(self, reference: bytes) -> None:
        offset, _ = decode_xfer_ref(reference)
        self._free.put_nowait(offset)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            with contextlib.suppress(OSError):
                os.close(self.fd)


async def _emit(callback: OutputCallback | None, data: bytes) -> None:
    if callback is not None:
        outcome = callback(data)
        if inspect.isawaitable(outcome):
            await outcome


RESYNC_AFTER_S = 2.0
"""How long a host that takes over from another waits for the agent's answer before it pads."""


class AgentClient:
    """A connection to one guest agent. Make one with :meth:`connect_unix`/:meth:`from_streams`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(hunt=True)  # skip a stale tail until the agent's HELLO
        self._nonce = os.urandom(16).hex()
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._closed_by: WardenError | None = None
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader_task: asyncio.Task[None] | None = None
        self._xfer: _XferWindow | None = None
        self.agent_hello: dict[str, Any] = {}
        """The agent's HELLO: ``version``, ``agent`` and ``pid``."""

    # -- connecting

    @classmethod
    async def connect_unix(
        cls, path: str | Path, *, timeout: float, resync: bool = False
    ) -> AgentClient:
        """Connect to the agent's unix socket (retrying until it exists) and say HELLO.

        ``resync``: take over from an earlier host that may have died mid-frame (a manager
        restarted after kill -9); see ``RESYNC_PADDING_SIZE`` in :mod:`warden.wire.frame`.
        Raises :class:`~warden.AgentTimeoutError` if both do not happen within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() >= deadline:
                    raise AgentTimeoutError(
                        f"could not connect to the guest agent socket {path} within "
                        f"{timeout:g}s: {exc}"
                    ) from None
                await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        return await cls.from_streams(
            reader, writer, timeout=max(0.0, deadline - loop.time()), resync=resync
        )

    @classmethod
    async def from_streams(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float,
        resync: bool = False,
    ) -> AgentClient:
        """Say HELLO over an open stream pair. Raises AgentTimeoutError if no answer in time."""
        client = cls(reader, writer)
        try:
            async with asyncio.timeout(timeout):
                await client._handshake(resync=resync)
        except TimeoutError:
            await client.close()
            raise AgentTimeoutError(
                f"the guest agent did not answer HELLO within {timeout:g}s"
            ) from None
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, *, resync: bool) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name="warden-agent-reader")
        # A fresh seed and the time with every HELLO: a VM restored from a boot snapshot
        # must not share its RNG state or its clock with its siblings. The nonce comes back in
        # the agent's answer, which tells it apart from an answer to an earlier host.
        hello = {
            "versions": [PROTOCOL_VERSION],
            "nonce": self._nonce,
            "seed": os.urandom(32).hex(),
            "time": time.time(),
        }
        hello_frame = encode_json(FrameType.HELLO, 0, hello)
        await self._send(hello_frame)
        if resync:
            try:
                await asyncio.wait_for(asyncio.shield(self._hello), RESYNC_AFTER_S)
            except TimeoutError:
                # The agent may have taken our HELLO for the rest of a frame that an earlier
                # host left half-sent: complete any such frame (the agent then hunts past the
                # padding for a HELLO), and say HELLO again.
                await self._send(bytes(RESYNC_PADDING_SIZE) + hello_frame)
        reply = await self._hello
        if reply.get("version") != PROTOCOL_VERSION:
            error = ProtocolError(
                f"the guest agent chose protocol version {reply.get('version')!r}"
            )
            self._abort(error)
            raise error
        self.agent_hello = reply

    # -- the connection

    def enable_xfer(self, path: Path, *, slots: int, slot_size: int) -> bool:
        """Send large file writes through the transfer window backed by ``path``.

        Only if the agent found the window's disk (its HELLO says ``xfer``). Returns whether
        the window is in use.
        """
        if not 0 < slot_size <= XFER_MAX_LENGTH or slot_size % 4096:
            raise ValueError(f"slot_size must be a multiple of 4096 up to {XFER_MAX_LENGTH}")
        if not self.agent_hello.get("xfer") or self._xfer is not None:
            return self._xfer is not None
        self._xfer = _XferWindow(path, slots, slot_size)
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
            return SandboxClosedError("the agent connection is closed")
        return type(cause)(*cause.args)

    async def _send(self, data: bytes) -> None:
        if self._closed_by is not None:
            raise self._closed_error()
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._abort(_ConnectionLostError(f"the connection to the guest agent broke: {exc}"))
            raise self._closed_error() from exc

    def _send_nowait(self, data: bytes) -> None:
        if self._closed_by is None and not self._writer.is_closing():
            self._writer.write(data)

    def _abort(self, error: WardenError) -> None:
        """Close the connection and fail every pending request with (a copy of) ``error``."""
        if self._closed_by is not None:
            return
        self._closed_by = error
        if self._xfer is not None:
            self._xfer.close()
        if not self._hello.done():
            self._hello.set_exception(type(error)(*error.args))
            self._hello.exception()  # mark it retrieved: the handshake may have given up already
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            request.deliver(type(error)(*error.args))
        self._writer.close()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    self._abort(_ConnectionLostError("the guest agent closed the connection"))
                    return
                error = self._feed(data)
                while error is not None and not self._hello.done() and self._closed_by is None:
                    self._decoder.resync()  # not the agent's answer yet: hunt on
                    error = self._feed(b"")
                if error is not None and self._closed_by is None:
                    self._protocol_error(f"malformed frame from the guest agent: {error}")
                if self._closed_by is not None:
                    return
        except (ConnectionError, OSError) as exc:
            self._abort(_ConnectionLostError(f"the connection to the guest agent broke: {exc}"))

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

    def _protocol_error(self, message: str) -> None:
        """Tell the agent (ERROR on request 0) and close, failing everything with ProtocolError."""
        with contextlib.suppress(FrameError):
            self._send_nowait(
                encode_json(FrameType.ERROR, 0, {"error": "protocol", "message": message})
            )
        self._abort(ProtocolError(message))

    def _greeting(self, frame: Frame) -> None:
        """Before the agent's answer to our HELLO: everything else is stale, from an earlier
        host's session (an answer or an error carries the nonce of the HELLO it answers)."""
        if frame.request_id != 0 or frame.type not in (FrameType.HELLO, FrameType.ERROR):
            return
        try:
            reply = decode_json(frame)
        except FrameError:
            return  # stale bytes that looked like a HELLO
        if reply.get("nonce") != self._nonce:
            return
        if frame.type == FrameType.HELLO:
            self._hello.set_result(reply)
        else:
            self._abort(
                ProtocolError(f"the guest agent refused the HELLO: {reply.get('message', reply)}")
            )

    def _dispatch(self, frame: Frame) -> None:
        """Route one frame from the agent. Raises FrameError on a malformed one."""
        ftype, rid = frame.type, frame.request_id
        if rid == 0:
            if ftype == FrameType.ERROR:
                report = decode_json(frame)
                self._abort(
                    ProtocolError(
                        f"the guest agent reported a protocol error and dropped the connection: "
                        f"{report.get('message', report)}"
                    )
                )
            else:
                raise FrameError(f"unexpected {ftype.name} frame on request 0")
            return
        if ftype not in (FrameType.DATA, FrameType.EOF, FrameType.RESPONSE):
            raise FrameError(f"unexpected {ftype.name} frame from the agent")
        if ftype == FrameType.DATA and frame.channel == Channel.XFER:
            if self._xfer is None:
                raise FrameError("a transfer window acknowledgement, but no window is open")
            self._xfer.release(frame.payload)
            return
        item: _Item = decode_json(frame) if ftype == FrameType.RESPONSE else frame
        request = self._requests.get(rid)
        if request is None:
            return  # a request the caller abandoned (cancelled); its late frames are dropped
        if ftype == FrameType.RESPONSE:
            del self._requests[rid]
        request.deliver(item)

    @contextlib.asynccontextmanager
    async def _request(self, args: dict[str, Any]) -> AsyncIterator[_Request]:
        """Send a REQUEST and yield its stream; CANCEL it if the caller leaves early."""
        if self._closed_by is not None:
            raise self._closed_error()
        rid = self._next_id
        self._next_id = rid + 1 if rid < 0xFFFFFFFF else 1
        request = _Request(self, rid, str(args["op"]))
        self._requests[rid] = request
        try:
            await self._send(encode_json(FrameType.REQUEST, rid, args))
            yield request
        except BaseException:
            request.cancel()
            raise
        finally:
            self._requests.pop(rid, None)

    async def _call(self, args: dict[str, Any]) -> dict[str, Any]:
        async with self._request(args) as request:
            return await request.response()

    # -- operations

    async def ping(self) -> float:
        """Round-trip time of a no-op request, in seconds."""
        start = time.perf_counter()
        await self._call({"op": "ping"})
        return time.perf_counter() - start

    async def info(self) -> dict[str, object]:
        """Kernel release, uptime, memory, agent version and pid of the guest."""
        response = await self._call({"op": "info"})
        response.pop("ok", None)
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
    ) -> ExecResult:
        """Run a command in the guest and wait for it.

        A string runs under ``/bin/sh -c``; a list is an argv. Output is streamed to the
        callbacks as it arrives and also collected in the result. A command that cannot be
        started gives exit code 127 (126 if not executable), like a shell. Raises
        :class:`~warden.CommandTimeoutError` (with ``.result``) when ``timeout`` passes.
        Cancelling the call kills the command's process group.
        """
        args: dict[str, Any] = {"op": "exec", "stdin": stdin is not None}
        if isinstance(cmd, str):
            args["shell"] = cmd
        else:
            args["argv"] = list(cmd)
        if env is not None:
            args["env"] = dict(env)
        if cwd is not None:
            args["cwd"] = cwd
        if timeout is not None:
            args["timeout"] = timeout
        stdout, stderr = bytearray(), bytearray()
        async with self._request(args) as request:
            feeder = None
            if stdin is not None:
                feeder = asyncio.create_task(self._feed_stdin(request, stdin))
            try:
                while True:
                    item = await request.next()
                    if isinstance(item, dict):
                        response = item
                        break
                    if item.type != FrameType.DATA:
                        continue
                    if item.channel == Channel.STDOUT:
                        stdout += item.payload
                        await _emit(on_stdout, item.payload)
                    elif item.channel == Channel.STDERR:
                        stderr += item.payload
                        await _emit(on_stderr, item.payload)
            finally:
                feeder_error = None
                if feeder is not None:
                    feeder.cancel()
                    await asyncio.wait([feeder])
                    if not feeder.cancelled():
                        feeder_error = feeder.exception()
            if feeder_error is not None:
                raise feeder_error  # the stdin source failed, so the command was cancelled
        result = ExecResult(
            exit_code=_opt_int(response.get("exit_code")),
            signal=_opt_int(response.get("signal")),
            stdout=bytes(stdout),
            stderr=bytes(stderr),
            timed_out=bool(response.get("timed_out")),
        )
        if result.timed_out:
            error = CommandTimeoutError(
                f"the command ran longer than its timeout={timeout}s and was killed; pass a "
                f"larger timeout= (or timeout=None) to let it run longer: {cmd!r}"
            )
            error.result = result  # the partial output, for the caller
            raise error
        return result

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
    ) -> int:
        """Write a file in the guest atomically (temp file + rename). Returns its size."""
        args = {"op": "write", "path": path, "mode": mode, "parents": parents}
        xfer = self._xfer
        async with self._request(args) as request:
            async for chunk in _chunks(data, xfer.slot_size if xfer else SEND_CHUNK):
                if request.has_news():
                    break  # the agent refused early (e.g. a missing dir): stop sending
                if xfer is not None and len(chunk) >= XFER_MIN:
                    await request.send_data(Channel.XFER, await xfer.put(chunk))
                else:
                    await request.send_data(Channel.FILE, chunk)
            else:
                await request.send_eof(Channel.FILE)
            response = await request.response()
        return int(response["size"])

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """Stream a file from the guest in chunks. Leaving the loop early cancels the read."""
        async with self._request({"op": "read", "path": path}) as request:
            while True:
                item = await request.next()
                if isinstance(item, dict):
                    return
                if item.type == FrameType.DATA and item.channel == Channel.FILE:
                    yield item.payload

    async def read_file_bytes(self, path: str) -> bytes:
        """A whole file from the guest."""
        return b"".join([chunk async for chunk in self.read_file(path)])

    async def list_dir(self, path: str) -> list[EntryInfo]:
        response = await self._call({"op": "list", "path": path})
        entries = response.get("entries")
        if not isinstance(entries, list):
            raise ProtocolError("the guest agent sent a list response without entries")
        return [EntryInfo.from_json(entry) for entry in entries]

    async def stat(self, path: str) -> EntryInfo:
        response = await self._call({"op": "stat", "path": path})
        return EntryInfo.from_json(response.get("entry"))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call({"op": "remove", "path": path, "recursive": recursive})

    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self._call({"op": "mkdir", "path": path, "parents": parents, "mode": mode})

    async def shutdown(self) -> None:
        """Ask the agent to power the guest off; returns once it agreed (or hung up)."""
        # The guest may go down before (or instead of) answering.
        with contextlib.suppress(_ConnectionLostError):
            await self._call({"op": "shutdown"})
        await self.close()

    async def close(self) -> None:
        """Close the connection. Pending requests fail with SandboxClosedError."""
        self._abort(SandboxClosedError("the agent connection was closed"))
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
