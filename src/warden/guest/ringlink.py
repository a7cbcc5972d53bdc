"""This VM's end of a link over shared memory: the sealed records go through the region's rings.

``link-open`` with ``transport: "ring"`` and ``link_id`` (16 bytes, hex). The host plugged the
link's region into this VM (an ``ivshmem-plain`` device) before it asked; the agent, in a
thread (the request's answer waits, the session does not):

1. **Finds the region** (:func:`warden.guest.ring.find`: polls the devices for up to 10 s,
   maps the one whose header holds ``link_id``, skipping those of its other links). None:
   the request is answered with an ``invalid`` error, nothing mapped and no socket made.
2. **Makes the socket** (the same semantics as the relay, :mod:`warden.guest.link`) and sends
   one WINDOW frame on STDIN, which tells the host the end is open (as the relay's first grant
   does). No DATA frames follow: the records go through the region, role ``a`` writing
   direction 0 and reading 1, ``b`` the reverse. The request stays open until the link ends.
3. **Moves records**, both directions in one thread (no hand-off between threads on a
   record's path). Out: what the client has (up to ``MAX_PLAINTEXT``) is read into one record,
   sealed (:class:`~warden.channel.linkseal.Sealer`) and written to this end's ring; while the
   ring is full the record waits and the client is not read: the ring's capacity is the flow
   control. In: the other end's records are copied out of its ring, opened and written to the
   client's non-blocking socket; while the client does not read, its ring is not read either.
   Between polls the thread waits on the client's socket with the ring's backoff as timeout, so
   the client's bytes go out at once. The client's EOF is the END record; the other end's END
   shuts the client's reading side.
4. **Ends.** On the link's end, clean or not (``link-close``, a cancel, an error, a record that
   fails authentication, a ring the other end broke), the traffic stops, the region is unmapped
   and its fd closed under the region's lock (no thread touches it after :meth:`stop` returned,
   so ``link-close`` is answered only once the region is untouched: the host then zeroes and
   truncates it), then the device's slot is powered off (best effort) so that QEMU can finish
   the unplug.

``plain`` (bool, the host's benchmark only) puts the plaintext in the records instead of sealed
bytes, to measure the crypto's share; nothing else asks for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading

from warden.channel.linkseal import MAX_PLAINTEXT, OVERHEAD, LinkAuthError, Opener, Sealer
from warden.guest import ring
from warden.guest.args import Invalid, failure
from warden.guest.link import POLL_MS, RECEIVE_WINDOW, Link, link_args
from warden.guest.log import log
from warden.wire.frame import Channel, encode_window
from warden.wire.ops import ErrorKind, Key
from warden.wire.ring import ID_SIZE, KIND_DATA, KIND_END, RingLayoutError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from warden.guest.session import Session

_FD_SETSIZE = 1024
"""``select`` takes fds below this only."""


class _Sealed:
    """Records sealed with the link's key (:mod:`warden.channel.linkseal`)."""

    def __init__(self, key: bytes, role: str) -> None:
        self.sealer = Sealer(key, role)
        self.opener = Opener(key, role)

    def seal(self, plaintext: bytes) -> bytes:
        return self.sealer.seal(plaintext)

    def end(self) -> bytes:
        return self.sealer.end()

    def open(self, kind: int, record: bytes) -> bytes | None:
        if (kind == KIND_END) != (len(record) == OVERHEAD):
            raise LinkAuthError("a record's kind does not match its size")
        return self.opener.open(record)


class _Plain:
    """Records of plaintext (``plain``: the host's benchmark only)."""

    def seal(self, plaintext: bytes) -> bytes:
        return plaintext

    def end(self) -> bytes:
        return b""

    def open(self, kind: int, record: bytes) -> bytes | None:
        if (kind == KIND_END) != (not record):
            raise LinkAuthError("a record's kind does not match its size")
        return None if kind == KIND_END else record


def _ring_args(args: dict[str, Any]) -> tuple[bytes, bool]:
    link_id, plain = args.get(Key.LINK_ID), args.get(Key.PLAIN, False)
    try:
        raw = bytes.fromhex(link_id) if isinstance(link_id, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != ID_SIZE:
        raise Invalid(f"a ring link's id is {ID_SIZE} bytes of hex")
    if not isinstance(plain, bool):
        raise Invalid("'plain' must be a boolean")
    return raw, plain


class _Closed(Exception):
    """The link stopped: its region is gone."""


class _Flow:
    """What one end's pump holds between polls."""

    def __init__(self) -> None:
        self.inbound: memoryview | None = None
        """Plaintext of the other end not yet written to the client."""
        self.outbound: tuple[int, bytes] | None = None
        """A record (kind, bytes) not yet in this end's ring: it did not fit."""
        self.reading = True
        """The client has not shut its side down."""
        self.receiving = True
        """The other end has not sent its END."""
        self.readable = True
        """The client's socket may have bytes (False once a read would block)."""
        self.writable = True
        """The client's socket may take bytes (False once a write would block)."""


def _ready(reads: list[int], writes: list[int], timeout: float) -> tuple[list[int], list[int]]:
    """The fds ready within ``timeout`` seconds: ``select`` (microseconds) where the fds allow
    it, else ``poll`` (its timeout is rounded up to a millisecond)."""
    if max(reads + writes) < _FD_SETSIZE:
        readable, writable, _ = select.select(reads, writes, [], timeout)
        return readable, writable
    poller = select.poll()
    for fd in reads:
        poller.register(fd, select.POLLIN)
    for fd in writes:
        poller.register(fd, select.POLLOUT | (select.POLLIN if fd in reads else 0))
    events = poller.poll(timeout * 1000)
    readable = [fd for fd, ev in events if fd in reads and ev & ~select.POLLOUT]
    writable = [fd for fd, ev in events if fd in writes and ev & ~select.POLLIN]
    return readable, writable


class RingLink(Link):
    """An end whose records go through the link's shared-memory region."""

    def __init__(self, session: Session, request_id: int, args: dict[str, Any]) -> None:
        name, key, role = link_args(args)
        self.link_id, plain = _ring_args(args)
        super().__init__(session, request_id, name)
        self.role = role
        self.codec = _Plain() if plain else _Sealed(key, role)
        del key
        self.region_lock = threading.Lock()
        """Held around every touch of the region; :meth:`_release` unmaps under it."""
        self.region: ring.Region | None = None
        self.ring: ring.Ring | None = None

    def _begin(self) -> None:
        self._spawn(self._open, "open")

    def _run(self, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except ring.RingError as exc:
                log(f"link {self.name}: {exc}; it is closed")
                self.close(f"the other end broke the link's shared memory: {exc}", clean=False)

        super()._run(guarded)

    # -- opening (thread)

    def _open(self) -> None:
        try:
            region = ring.find(self.link_id, self.region_lock, lambda: self.closed)
        except RingLayoutError as exc:
            self._refuse(str(exc))
            return
        if region is None:
            return  # stopped meanwhile: the close answered the request
        with self.region_lock:
            if not self.closed:
                self.region, self.ring = region, ring.Ring(region.mapping, self.role)
        if self.region is not region:  # stopped meanwhile
            region.close()
            ring.unplug(region)
            return
        try:
            server = self._listen()
        except OSError as exc:
            self._refuse(f"cannot make {self.path}: {exc.strerror}")
            return
        with self.cond:
            taken = not self.closed
            if taken:
                self.listener = server
        if not taken:  # stopped meanwhile: no socket may be left
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            server.close()
            return
        self.session.writer.send(encode_window(self.request_id, Channel.STDIN, RECEIVE_WINDOW))
        self._start_pumps()

    def _refuse(self, reason: str) -> None:
        """Answer ``link-open`` with an error: nothing mapped, no socket (unless a close
        answered it already)."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
        self._release()
        self._forget()
        self.finish(failure(ErrorKind.INVALID, f"link {self.name}: {reason}"))

    # -- moving records (one thread)

    def _start_pumps(self) -> None:
        self._spawn(self._pump, "pump")

    def _pump(self) -> None:
        """Both directions in one thread: the other end's records to the client, the client's
        bytes to this end's ring. One thread, so no hand-off between threads (and their GIL)
        sits on a record's path; the client's socket is non-blocking, so a client that does
        not read never stops the other direction."""
        conn = self._accept()
        if conn is None:
            return
        conn.setblocking(False)
        flow = _Flow()
        backoff = ring.Backoff()
        try:
            while not self.closed:
                moved = self._inward(conn, flow)
                moved = self._outward(conn, flow) or moved
                if moved:
                    backoff.reset()
                elif not self.closed:
                    self._idle(conn, flow, backoff)
        except _Closed:
            return

    def _inward(self, conn: socket.socket, flow: _Flow) -> bool:
        """The other end's next record opened, and as much of it written as the client takes
        without blocking; whether anything moved."""
        moved = False
        if flow.receiving and flow.inbound is None:
            item = self._take()
            if item is not None:
                moved = True
                plaintext = self.codec.open(*item)
                if plaintext is None:
                    flow.receiving = False
                    conn.shutdown(socket.SHUT_WR)  # the client reads EOF
                    self._ended(sent=False)
                elif plaintext:
                    flow.inbound = memoryview(plaintext)
        if flow.inbound is not None and flow.writable:
            try:
                sent = conn.send(flow.inbound)
            except BlockingIOError:
                flow.writable = False
                return moved
            flow.inbound = flow.inbound[sent:] if sent < len(flow.inbound) else None
            moved = True
        return moved

    def _outward(self, conn: socket.socket, flow: _Flow) -> bool:
        """What the client has (up to ``MAX_PLAINTEXT``) sealed into one record, and the record
        written to this end's ring if it fits; whether anything moved."""
        moved = False
        if flow.reading and flow.outbound is None and flow.readable:
            try:
                data = conn.recv(MAX_PLAINTEXT)
            except BlockingIOError:
                flow.readable = False
                return False
            moved = True
            if data:
                flow.outbound = (KIND_DATA, self.codec.seal(data))
            else:  # the client shut its side down
                flow.reading = False
                flow.outbound = (KIND_END, self.codec.end())
        if flow.outbound is not None and self._put(*flow.outbound):
            kind, flow.outbound, moved = flow.outbound[0], None, True
            if kind == KIND_END:
                self._ended(sent=True)
        return moved

    def _idle(self, conn: socket.socket, flow: _Flow, backoff: ring.Backoff) -> None:
        """Wait until the client's socket is ready for what is pending, the link stops, or it
        is time to poll the ring again (with backoff: ivshmem-plain has no doorbell)."""
        polling = (flow.receiving and flow.inbound is None) or flow.outbound is not None
        timeout = backoff.timeout() if polling else POLL_MS / 1000
        reads = [self.stop_r]
        if flow.reading and flow.outbound is None:
            reads.append(conn.fileno())
        writes = [conn.fileno()] if flow.inbound is not None else []
        readable, writable = _ready(reads, writes, timeout)
        flow.readable = flow.readable or conn.fileno() in readable
        flow.writable = flow.writable or conn.fileno() in writable

    def _put(self, kind: int, record: bytes) -> bool:
        """Write one record if it fits now (the ring's capacity is the flow control)."""
        with self.region_lock:
            if self.ring is None:
                raise _Closed
            return self.ring.put(kind, record)

    def _take(self) -> tuple[int, bytes] | None:
        """The other end's next record, if there is one."""
        with self.region_lock:
            if self.ring is None:
                raise _Closed
            return self.ring.take()

    # -- the end

    def _release(self) -> None:
        """Unmap the region under its lock (no thread touches it after this), then power its
        slot off."""
        with self.region_lock:
            region, self.region = self.region, None
            if self.ring is not None:
                self.ring.release()
                self.ring = None
            if region is not None:
                region.close()
        if region is not None:
            ring.unplug(region)
