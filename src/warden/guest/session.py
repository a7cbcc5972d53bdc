"""One host's session: from its HELLO to EOF, a protocol error, or the next HELLO.

The agent speaks one session version, :data:`~warden.wire.frame.SESSION_VERSION` (2): WINDOW
credit for every stream it sends (:mod:`warden.guest.flow`), and the unprivileged ``user`` as
the account of a request that names none. A HELLO that does not offer it is refused.
"""

from __future__ import annotations

import os
import threading

from warden.guest import files, users
from warden.guest.args import Invalid, Shutdown, arg_bool, failure, file_error
from warden.guest.exec import Exec
from warden.guest.fileread import ReadFile
from warden.guest.filewrite import WriteFile
from warden.guest.info import AGENT_NAME, op_info
from warden.guest.log import log, log_exception
from warden.wire.frame import (
    SESSION_VERSION,
    Channel,
    FrameError,
    FrameType,
    decode_json,
    decode_window,
    encode_header,
    encode_json,
    encode_xfer_ref,
)
from warden.wire.ops import ErrorKind, Key, Op

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from warden.channel.window import WindowAuth
    from warden.guest.agent import Agent
    from warden.guest.request import Request
    from warden.guest.writer import Writer
    from warden.wire.frame import Frame

_FILE_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    Op.STAT: files.op_stat,
    Op.LIST: files.op_list,
    Op.REMOVE: files.op_remove,
    Op.MKDIR: files.op_mkdir,
}


class Session:
    """Made by the connection when a HELLO arrives. Its writer dies with it, so frames of its
    requests that finish later never reach the next host's session."""

    def __init__(self, agent: Agent, writer: Writer) -> None:
        self.agent = agent
        self.writer = writer
        self.broken = False
        self.requests: dict[int, Request] = {}
        self._lock = threading.Lock()
        self.piece = 0
        """The sequence number of the transfer-window piece being handled."""
        self.pieces = 0
        """Transfer-window references received in this session: the sequence number of the
        next piece (``warden.channel.window``), counted in the order they arrive."""
        self.window: WindowAuth | None = None
        """Checks the transfer window's pieces (the HELLO's ``xfer_key``): on the encrypted
        channel a piece without a valid tag is refused; on a plaintext one there is none."""
        self.read_window: WindowAuth | None = None
        """Tags the pieces of file reads (guest -> host), under ``reads_key`` of that key."""
        self.read_pieces = 0
        """Pieces of file reads sent in this session: the sequence number of the next one."""
        self._piece_lock = threading.Lock()
        """Numbers, tags and sends one read's piece at a time, so they go out in order."""

    # -- sending (any thread)

    def send_data(self, request_id: int, channel: int, data: bytes) -> bool:
        header = encode_header(FrameType.DATA, request_id, channel, len(data))
        return self.writer.send(header, data)  # no copy of the payload to join them

    def send_eof(self, request_id: int, channel: int) -> bool:
        return self.writer.send(encode_header(FrameType.EOF, request_id, channel, 0))

    def respond(
        self, request_id: int, response: dict[str, Any], eofs: tuple[int, ...] = ()
    ) -> None:
        """Send the response, after the EOFs of ``eofs`` (channels), all in one send: on the
        encrypted channel, one record (each record costs the guest an AEAD call and a write)."""
        try:
            data = encode_json(FrameType.RESPONSE, request_id, response)
        except FrameError as exc:
            message = f"cannot send the response: {exc}"
            data = encode_json(FrameType.RESPONSE, request_id, failure(ErrorKind.AGENT, message))
        ends = b"".join(encode_header(FrameType.EOF, request_id, c, 0) for c in eofs)
        self.writer.send(ends + data)

    def window_reads(self) -> bool:
        """Whether file reads may go through the transfer window in this session."""
        xfer = self.agent.xfer
        if xfer is None or not xfer.writable:
            return False
        return self.read_window is not None or not self.writer.encrypted

    def send_piece(self, request_id: int, offset: int, piece: memoryview) -> bool:
        """Send the reference to a piece of a file read that is in the window at ``offset``,
        tagged under the next sequence number; False once the session is gone."""
        with self._piece_lock:
            tag = b""
            if self.read_window is not None:
                tag = self.read_window.tag_in_place(request_id, self.read_pieces, piece)
            self.read_pieces += 1
            reference = encode_xfer_ref(offset, len(piece), tag)
            return self.send_data(request_id, Channel.XFER_READ, reference)

    def forget(self, request_id: int) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    # -- receiving (main thread)

    def protocol_error(self, message: str, nonce: object = None) -> None:
        """Tell the host (ERROR on request 0) and end the session."""
        log(f"protocol error: {message}")
        report: dict[str, Any] = {Key.ERROR: ErrorKind.PROTOCOL, Key.MESSAGE: message}
        if nonce is not None:
            report[Key.NONCE] = nonce
        self.writer.send(encode_json(FrameType.ERROR, 0, report))
        self.close()

    def close(self) -> None:
        """End the session: stop sending, kill its processes, drop its requests."""
        self.broken = True
        self.writer.close()
        with self._lock:
            ops = list(self.requests.values())
        for op in ops:
            try:
                op.cancel()
            except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                log_exception("cancel")

    def hello(self, frame: Frame) -> None:
        """Answer the HELLO that began this session, echoing its nonce."""
        try:
            hello = decode_json(frame)
        except FrameError as exc:
            self.protocol_error(str(exc))
            return
        nonce = hello.get(Key.NONCE)
        offered = hello.get(Key.VERSIONS)
        if not isinstance(offered, list) or SESSION_VERSION not in offered:
            self.protocol_error(
                f"no common protocol version: the host offers {offered!r:.100}, "
                f"the agent speaks [{SESSION_VERSION}]",
                nonce,
            )
            return
        problem = self._channel_keys(hello)
        if problem is not None:
            self.protocol_error(problem, nonce)
            return
        if self.agent.xfer is not None:
            self.agent.xfer.quiesce()  # no read of an earlier session writes into the window
        if os.getpid() == 1:  # only ever in a guest: never touch a host's clock or pool
            from warden.guest.pid1 import freshen

            freshen(hello.get(Key.SEED), hello.get(Key.TIME), hello.get(Key.HOSTNAME))
        reply: dict[str, Any] = {
            Key.VERSION: SESSION_VERSION,
            Key.AGENT: AGENT_NAME,
            Key.PID: os.getpid(),
            Key.XFER: self.agent.xfer is not None,
            Key.XFER_READ: self.window_reads(),
        }
        if Key.REKEY in hello:
            reply[Key.REKEYED] = True
        if nonce is not None:
            reply[Key.NONCE] = nonce
        try:
            self.writer.send(encode_json(FrameType.HELLO, 0, reply))
        except FrameError as exc:  # a nonce too big to echo
            self.protocol_error(f"cannot answer the HELLO: {exc}")

    def _channel_keys(self, hello: dict[str, Any]) -> str | None:
        """Take the HELLO's keys (only on the encrypted channel): the transfer window's key
        and a new channel secret; what is wrong with them, if anything."""
        keys = {k: hello.get(k) for k in (Key.XFER_KEY, Key.REKEY) if k in hello}
        if keys and not self.writer.encrypted:
            return "keys in a HELLO on a plaintext channel"
        decoded: dict[str, bytes] = {}
        for name, value in keys.items():
            try:
                decoded[name] = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                decoded[name] = b""
            if len(decoded[name]) != 32:
                return f"the HELLO's {name} is not 32 bytes of hex"
        if Key.XFER_KEY in decoded:
            from warden.channel.window import WindowAuth, reads_key

            self.window = WindowAuth(decoded[Key.XFER_KEY])
            self.read_window = WindowAuth(reads_key(decoded[Key.XFER_KEY]))
        if Key.REKEY in decoded:
            self.agent.secret = decoded[Key.REKEY]  # for every later handshake
            log("the host handed this VM a new channel secret")
        return None

    def handle(self, frame: Frame) -> None:
        """Act on one frame of this session (any but HELLO). Raises :class:`Shutdown`."""
        try:
            self._handle(frame)
        except FrameError as exc:
            self.protocol_error(str(exc))
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            log_exception(f"handling {frame.type.name}")
            if frame.type == FrameType.REQUEST:
                self.forget(frame.request_id)
                message = "internal error in the agent (see the console)"
                self.respond(frame.request_id, failure(ErrorKind.AGENT, message))

    def _handle(self, frame: Frame) -> None:
        ftype, rid = frame.type, frame.request_id
        if ftype == FrameType.REQUEST:
            self._request(frame)
        elif ftype == FrameType.WINDOW:
            increment = decode_window(frame.payload)  # FrameError: a protocol error
            op = self._op(rid)
            if op is not None:  # else finished or unknown: ignored
                op.on_window(frame.channel, increment)
        elif ftype in (FrameType.DATA, FrameType.EOF, FrameType.CANCEL):
            self._stream_frame(frame)
        elif ftype == FrameType.ERROR:
            log(f"the host reported a protocol error: {frame.payload[:500]!r}")
            self.close()
        else:
            self.protocol_error(f"unexpected {ftype.name} frame from the host")

    def _op(self, rid: int) -> Request | None:
        with self._lock:
            return self.requests.get(rid)

    def _stream_frame(self, frame: Frame) -> None:
        op = self._op(frame.request_id)
        if frame.type == FrameType.DATA and frame.channel == Channel.XFER:
            self.piece = self.pieces  # for the op to check the piece with
            self.pieces += 1
        if op is None:
            if frame.type == FrameType.DATA and frame.channel == Channel.XFER:
                # Every window reference is acknowledged, even for a finished request,
                # or the host would lose that part of its window.
                self.send_data(frame.request_id, Channel.XFER, frame.payload)
            return  # a request that already finished (or never started): not an error
        if frame.type == FrameType.DATA:
            op.on_data(frame)
        elif frame.type == FrameType.EOF:
            op.on_eof(frame)
        else:
            op.cancel()

    def _request(self, frame: Frame) -> None:
        rid = frame.request_id
        if rid == 0:
            self.protocol_error("REQUEST on request id 0")
            return
        if self._op(rid) is not None:
            self.protocol_error(f"request id {rid} is already in use")
            return
        args = decode_json(frame)
        op = args.get(Key.OP)
        try:
            if not isinstance(op, str):
                raise Invalid("a request needs an 'op' string")
            self._dispatch(rid, op, args)
        except Invalid as exc:
            self.respond(rid, failure(ErrorKind.INVALID, f"{op}: {exc}"))

    def _dispatch(self, rid: int, op: str, args: dict[str, Any]) -> None:
        if op == Op.PING:
            if Key.TIME in args and os.getpid() == 1:  # the VM was stopped: its clock stood
                from warden.guest.pid1 import freshen

                freshen(None, args.get(Key.TIME))
            self.respond(rid, {Key.OK: True})
        elif op == Op.INFO:
            self.respond(rid, {**op_info(args), Key.OK: True})
        elif op == Op.SHUTDOWN:
            reboot = arg_bool(args, Key.REBOOT, False)
            self.respond(rid, {Key.OK: True})
            raise Shutdown(reboot)
        elif op in _FILE_OPS:
            self.respond(rid, self._file_op(op, args))
        else:
            self._streamed(rid, op, args)

    def _streamed(self, rid: int, op: str, args: dict[str, Any]) -> None:
        """The ops that outlive their REQUEST frame (exec, read, write, links)."""
        if op == Op.EXEC:
            self._start(Exec(self, rid, args, users.account(args)))
        elif op == Op.READ:
            self._start(ReadFile(self, rid, args, users.account(args)))
        elif op == Op.WRITE:
            writer = WriteFile(self, rid, args, users.account(args))
            if writer.start():
                with self._lock:
                    self.requests[rid] = writer
        elif op in (Op.LINK_OPEN, Op.LINK_CLOSE):
            self._link(rid, op, args)
        else:
            self.respond(rid, failure(ErrorKind.INVALID, f"unknown op {op!r}"))

    def _link(self, rid: int, op: str, args: dict[str, Any]) -> None:
        """Open a link's end (a request that lasts as long as the link), or close one."""
        from warden.guest import link  # only VMs with links pay for importing socket

        if op == Op.LINK_CLOSE:
            reason = str(args.get(Key.REASON) or "closed by the host")[:500]
            stopped = link.stop_by_name(args.get(Key.NAME), reason)
            self.respond(rid, {Key.OK: True, Key.CLOSED: stopped is not None})
            if stopped is not None:  # answered first: its traffic already stopped
                stopped.wind_up(reason, clean=False)
            return
        end = link.make(self, rid, args)
        with self._lock:
            self.requests[rid] = end
        try:
            end.start()
        except Invalid:
            self.forget(rid)
            raise

    def _start(self, op: Exec | ReadFile) -> None:
        with self._lock:
            self.requests[op.request_id] = op
        op.start()

    def _file_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        account = users.account(args)
        files.load(op)
        try:
            with users.acting_as(account):
                result = _FILE_OPS[op](args)
        except Invalid:
            raise
        except OSError as exc:
            return file_error(op, str(args.get(Key.PATH)), exc)
        except Exception as exc:  # noqa: BLE001 - reported to the host
            log_exception(op)
            return failure(ErrorKind.AGENT, f"{op}: {type(exc).__name__}: {exc}")
        result[Key.OK] = True
        return result
