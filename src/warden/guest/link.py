"""This VM's end of a link: a unix socket whose bytes go, sealed, to the other VM.

Two transports carry the sealed records (:mod:`warden.channel.linkseal`): ``relay`` (this
module's :class:`RelayLink`: DATA frames of the request, relayed by the host) and ``ring``
(:class:`warden.guest.ringlink.RingLink`: a shared-memory region only the two VMs map).
``link-open``'s ``transport`` picks one (``relay`` when absent); the socket's semantics below
are the same for both, except where a paragraph names the relay.

``link-open`` (name, key, role) makes ``/run/warden/links/NAME.sock`` (the directory 0755, the
socket 0666: any workload user may connect) and keeps the request open for the link's life:

- **One connection.** The first client to connect takes the link; the socket's path is then
  removed and the listener closed, so a second ``connect`` fails (ENOENT, or ECONNREFUSED /
  ECONNRESET if it raced the first). A link carries one bidirectional byte stream.
- **Out** (relay). What the client writes is read within the request's STDOUT credit
  (WINDOW frames of the host, :mod:`warden.guest.flow`), sealed into records
  (:mod:`warden.channel.linkseal`) and sent as DATA on STDOUT. The client's
  ``shutdown(SHUT_WR)`` (or close) becomes an authenticated END record.
- **In** (relay). Records of the other end come as DATA on STDIN. The host may send only what
  this agent granted (WINDOW frames *from* the agent on STDIN: :data:`RECEIVE_WINDOW` at the start,
  which also tells the host the end is open, then each record's size once its plaintext was
  written to the client), so the agent holds at most that much. A record beyond it, or one
  that fails authentication, closes the link with an error. The END record shuts the
  client's reading side down: it reads EOF.
- **End.** Once both directions ended, the link is done: the request is answered
  (``clean``: true). ``link-close``, a cancel, the session's end (the host went away), the
  client's error or a bad record end it at once with an error (``clean``: false): the socket
  is shut down both ways, so the client reads EOF (ECONNRESET if it had sent bytes the agent
  had not read yet) and its writes fail with EPIPE. A unix socket has no way to make a read
  fail on purpose, so the agent also leaves ``NAME.error`` (0644) next to where the socket
  was, with the reason: a client that read EOF tells an error from the other end's normal
  end of stream by it. No END record is sent on an error, so the other end's client is
  never told the stream ended normally.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import threading
import time
from collections import deque

from warden.channel.linkseal import MAX_PLAINTEXT, OVERHEAD, LinkAuthError, Opener, Sealer
from warden.guest.args import Invalid
from warden.guest.log import log
from warden.guest.request import Request
from warden.wire.frame import Channel, encode_window
from warden.wire.ops import Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from warden.guest.session import Session
    from warden.wire.frame import Frame

LINK_DIR = "/run/warden/links"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
RECEIVE_WINDOW = 1 << 20
"""The bytes of records the host may send this end before the agent grants more."""
POLL_MS = 1000

_OPEN: dict[str, Link] = {}
_OPEN_LOCK = threading.Lock()


def link_dir() -> str:
    """Where the sockets are (a test agent outside a VM may set WARDEN_LINK_DIR)."""
    return os.environ.get("WARDEN_LINK_DIR", LINK_DIR) if os.getpid() != 1 else LINK_DIR


def link_args(args: dict[str, Any]) -> tuple[str, bytes, str]:
    name, key, role = args.get(Key.NAME), args.get(Key.LINK_KEY), args.get(Key.ROLE)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise Invalid("a link name is [a-z0-9][a-z0-9_.-]{0,62}")
    if role not in ("a", "b"):
        raise Invalid("a link role is 'a' or 'b'")
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise Invalid("a link key is 32 bytes of hex")
    return name, raw, str(role)


def make(session: Session, request_id: int, args: dict[str, Any]) -> Link:
    """The end that ``link-open`` asks for (Invalid for bad arguments); then :meth:`Link.start`."""
    transport = args.get(Key.TRANSPORT, "relay")
    if transport == "ring":
        from warden.guest.ringlink import RingLink

        return RingLink(session, request_id, args)
    if transport != "relay":
        raise Invalid("a link's transport is 'relay' or 'ring'")
    if args.get(Key.PLAIN, False) is not False:
        raise Invalid("'plain' is for the ring transport only")
    return RelayLink(session, request_id, args)


def stop_by_name(name: object, reason: str) -> Link | None:
    """``link-close``: stop the link ``name`` (then answer, then :meth:`Link.wind_up`)."""
    with _OPEN_LOCK:
        link = _OPEN.get(name) if isinstance(name, str) else None
    if link is None or not link.stop(reason, clean=False):
        return None
    return link


class Link(Request):
    """One end of a link: its socket, its threads and the end of its stream. A transport's
    subclass moves the records: :meth:`_begin`, :meth:`_pump_out`, :meth:`_pump_in`,
    :meth:`_release`."""

    def __init__(self, session: Session, request_id: int, name: str) -> None:
        super().__init__(session, request_id)
        self.name = name
        self.path = os.path.join(link_dir(), f"{self.name}.sock")
        self.cond = threading.Condition(threading.Lock())
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.closed = False
        self.sent_end = False
        self.got_end = False
        self._threads = 0

    # -- start (main thread)

    def start(self) -> None:
        """Claim the name and start; Invalid (nothing left open) if it cannot."""
        with _OPEN_LOCK:
            if self.name in _OPEN:
                self._close_fds()
                raise Invalid(f"a link named {self.name!r} is already open in this VM")
            _OPEN[self.name] = self
        self._begin()

    def _begin(self) -> None:
        raise NotImplementedError

    def _make_socket(self) -> None:
        """Make the socket; Invalid (the name released, nothing left open) if it cannot."""
        try:
            self.listener = self._listen()
        except OSError as exc:
            self._forget()
            self._close_fds()
            raise Invalid(f"cannot make {self.path}: {exc.strerror}") from None

    def _start_pumps(self) -> None:
        self._spawn(self._outbound, "out")
        self._spawn(self._pump_in, "in")

    def _spawn(self, target: Callable[[], None], label: str) -> None:
        with self.cond:
            self._threads += 1
        thread = threading.Thread(
            target=self._run, args=(target,), name=f"link-{label}-{self.name}", daemon=True
        )
        thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except LinkAuthError as exc:
            log(f"link {self.name}: {exc}; it is closed")
            self.close(f"a record from the other end was refused: {exc}", clean=False)
        except OSError as exc:
            self.close(f"the client's connection failed: {exc.strerror}", clean=False)
        except Exception as exc:  # noqa: BLE001 - the agent logs and carries on, never dies
            log(f"link {self.name}: internal error: {exc!r}")
            self.close(f"internal error: {type(exc).__name__}", clean=False)
        finally:
            self._thread_done()

    def _listen(self) -> socket.socket:
        os.makedirs(link_dir(), mode=0o755, exist_ok=True)
        for stale in (self.path, os.path.join(link_dir(), f"{self.name}.error")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)  # of an earlier link of this name (the name is free here)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            pending = f"{self.path}.{os.getpid()}.tmp"
            server.bind(pending)
            os.chmod(pending, 0o666)  # noqa: S103 - any workload user may connect, by design
            server.listen(1)
            os.rename(pending, self.path)
        except OSError:
            server.close()
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise
        return server

    def cancel(self) -> None:
        self.close("cancelled by the host", clean=False)

    # -- the client's bytes out (thread)

    def _outbound(self) -> None:
        conn = self._accept()
        if conn is not None:
            self._pump_out(conn)

    def _pump_out(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _pump_in(self) -> None:
        raise NotImplementedError

    def _wait(self, fd: int) -> bool:
        """Wait until ``fd`` is readable; False once the link is closed."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        while not self.closed:
            if any(f == fd for f, _ in poller.poll(POLL_MS)):
                return not self.closed
        return False

    def _accept(self) -> socket.socket | None:
        """The one connection; the path is removed and the listener closed once it came."""
        listener = self.listener
        assert listener is not None
        if not self._wait(listener.fileno()):
            return None
        conn, _ = listener.accept()
        with self.cond:
            if self.closed:
                conn.close()
                return None
            self.conn = conn
            self.cond.notify_all()
        self._unlisten()
        return conn

    def _connection(self) -> socket.socket | None:
        """The client's connection once it came; None once closed."""
        with self.cond:
            while not self.closed and self.conn is None:
                self.cond.wait()
            return None if self.closed else self.conn

    # -- the end

    def _ended(self, *, sent: bool) -> None:
        with self.cond:
            if sent:
                self.sent_end = True
            else:
                self.got_end = True
            done = self.sent_end and self.got_end
        if done:
            self.close("both directions ended", clean=True)

    def close(self, reason: str, *, clean: bool) -> None:
        """End the link (any thread; idempotent) and answer its request."""
        if self.stop(reason, clean=clean):
            self.wind_up(reason, clean=clean)

    def stop(self, reason: str, *, clean: bool) -> bool:
        """Stop the traffic at once: no byte passes after this (the quick half of
        :meth:`close`, which ``link-close`` answers after); False if it was stopped already."""
        with self.cond:
            if self.closed:
                return False
            self.closed = True
            conn = self.conn
            self.cond.notify_all()
        if not clean:  # before the client can see EOF
            self._note_error(reason)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in it
        with contextlib.suppress(OSError):
            os.write(self.stop_w, b"x")  # wakes a thread polling
        self._unlisten()  # the path is gone: no client can connect any more
        self._release()
        return True

    def _release(self) -> None:
        """The transport's part of :meth:`stop` (once; the link is marked closed)."""

    def wind_up(self, reason: str, *, clean: bool) -> None:
        """The rest of :meth:`close`: forget the link, answer its request."""
        self._forget()
        self.close_credits()
        self.finish({Key.OK: True, Key.REASON: reason, Key.CLEAN: clean})
        if not clean:
            log(f"link {self.name} closed: {reason}")

    def _forget(self) -> None:
        with _OPEN_LOCK:
            if _OPEN.get(self.name) is self:
                del _OPEN[self.name]

    def _note_error(self, reason: str) -> None:
        """Leave NAME.error (0644) saying why: a client that read EOF can tell an error from
        the other end's normal end of stream (the next link of that name removes it)."""
        path = os.path.join(link_dir(), f"{self.name}.error")
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(reason + "\n")

    def _unlisten(self) -> None:
        with self.cond:
            listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            listener.close()

    def _thread_done(self) -> None:
        with self.cond:
            self._threads -= 1
            last = self._threads == 0
        if last:
            self._close_fds()

    def _close_fds(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self._unlisten()
        for fd in (self.stop_r, self.stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class RelayLink(Link):
    """An end whose records the host relays: DATA frames of the ``link-open`` request."""

    def __init__(self, session: Session, request_id: int, args: dict[str, Any]) -> None:
        name, key, role = link_args(args)
        super().__init__(session, request_id, name)
        self.sealer = Sealer(key, role)
        self.opener = Opener(key, role)
        del key
        self.out_credit = self.new_credit(Channel.STDOUT)
        self.allowance = RECEIVE_WINDOW
        """Bytes of records the host may still send."""
        self.inbox: deque[bytes] = deque()

    def _begin(self) -> None:
        self._make_socket()
        self._grant(RECEIVE_WINDOW)  # first: it tells the host that this end is open
        self._start_pumps()

    # -- frames (main thread; never blocks)

    def on_data(self, frame: Frame) -> None:
        if frame.channel != Channel.STDIN or self.closed:
            return
        size = len(frame.payload)
        with self.cond:
            over = size > self.allowance
            if not over:
                self.allowance -= size
                self.inbox.append(frame.payload)
                self.cond.notify()
        if over:
            self.close("the host sent more than this end granted", clean=False)

    # -- the client's bytes out (thread)

    def _pump_out(self, conn: socket.socket) -> None:
        while not self.closed:
            credit = self.out_credit.wait(POLL_MS / 1000)
            if credit <= OVERHEAD:
                if credit:  # too little for a record: wait for the host's next grant
                    time.sleep(0.005)
                continue
            if not self._wait(conn.fileno()):
                return
            data = conn.recv(min(MAX_PLAINTEXT, credit - OVERHEAD))
            record = self.sealer.seal(data) if data else self.sealer.end()
            if not self.send(Channel.STDOUT, self.out_credit, record):
                return
            if not data:
                self._ended(sent=True)
                return

    # -- the other end's bytes in (thread)

    def _next_record(self) -> tuple[socket.socket, bytes] | None:
        """The connection and the next record, once both are there; None once closed."""
        with self.cond:
            while not self.closed and (self.conn is None or not self.inbox):
                self.cond.wait()
            if self.closed or self.conn is None:
                return None
            return self.conn, self.inbox.popleft()

    def _pump_in(self) -> None:
        while (item := self._next_record()) is not None:
            conn, record = item
            plaintext = self.opener.open(record)
            if plaintext is None:
                conn.shutdown(socket.SHUT_WR)  # the client reads EOF
                self._ended(sent=False)
                return
            conn.sendall(plaintext)
            with self.cond:
                self.allowance += len(record)
            self._grant(len(record))

    def _grant(self, size: int) -> None:
        self.session.writer.send(encode_window(self.request_id, Channel.STDIN, size))
