"""Serving connections: the byte stream from each host, cut into sessions at each HELLO."""

from __future__ import annotations

import os
import select
import threading
import time

from warden.channel.errors import ChannelError
from warden.channel.transport import Responder, abort_notice
from warden.guest.args import Shutdown
from warden.guest.log import log, log_exception
from warden.guest.reaper import Reaper
from warden.guest.session import Session
from warden.guest.writer import Writer
from warden.guest.xfer import XferWindow, find_xfer
from warden.wire.frame import FrameDecoder, FrameError, FrameType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from warden.channel.transport import Session as ChannelSession
    from warden.wire.frame import Frame

READ_SIZE = 256 * 1024
"""How much the main thread asks for per read of the connection."""
IDLE_POLL = 0.01
"""Sleep between reads while the host side of the port is disconnected."""


def _hung_up(poller: select.poll) -> bool:
    """Whether the host is disconnected from the virtio port right now (it reports POLLHUP)."""
    events = poller.poll(0)
    return bool(events) and bool(events[0][1] & (select.POLLHUP | select.POLLERR))


class Connection:
    """The byte stream from one host connection (the virtio port between two EOFs, or a socket).

    With a channel secret (always in a VM), the stream is the encrypted channel
    (:mod:`warden.channel.transport`): the agent hunts for the host's handshake, answers it,
    and then reads records. A record that fails (altered, replayed, reordered, truncated, from
    another session, or a new host's handshake after the old host died mid-stream) ends the
    channel session and its requests; the agent tells the host (an unauthenticated abort
    notice) and hunts for the next handshake in the bytes from that record on.

    Inside the channel, or on the plaintext stream of a local test agent, sessions begin at a
    HELLO. The plaintext decoder hunts for one (see ``RESYNC_PADDING_SIZE`` in
    :mod:`warden.wire.frame`): bytes before it are a stale tail of an earlier host's stream and
    are dropped. A malformed frame ends the session, and the hunt starts again from there; a
    HELLO in the middle of a session ends it and begins the next.
    """

    def __init__(self, agent: Agent, fd: int, lock: threading.Lock, *, poll_writes: bool) -> None:
        self.agent = agent
        self.fd = fd
        self.lock = lock
        self.poll_writes = poll_writes
        self.decoder = FrameDecoder(hunt=agent.secret is None)
        self.session: Session | None = None
        self.responder: Responder | None = None
        self.channel: ChannelSession | None = None

    def _writer(self, channel: ChannelSession | None = None) -> Writer:
        return Writer(self.fd, self.lock, poll_first=self.poll_writes, channel=channel)

    def feed(self, data: bytes) -> None:
        """Handle bytes from the host. Raises :class:`Shutdown` when asked to stop."""
        if self.agent.secret is None:
            self._feed_frames(data)
            return
        while data:
            data = self._handshake(data) if self.channel is None else self._records(data)

    def _handshake(self, data: bytes) -> bytes:
        """Hunt for the host's handshake; the bytes after it once a channel session began."""
        if self.responder is None:
            assert self.agent.secret is not None
            self.responder = Responder(self.agent.secret, self.agent.on_handshake)
        responder = self.responder
        channel = responder.receive(data)
        for failure in responder.failures:
            log(f"refused a channel handshake: {failure}")
        responder.failures.clear()
        reply = responder.data_to_send()
        if reply:
            self._writer().send(reply)
        if channel is None:
            return b""
        self.responder = None
        self.channel = channel
        self.decoder = FrameDecoder()
        return responder.rest

    def _records(self, data: bytes) -> bytes:
        """Decrypt records and act on their frames; after a failed record, the bytes from it on
        (the hunt for a new handshake starts there)."""
        channel = self.channel
        assert channel is not None
        try:
            plaintext = channel.feed(data)
        except ChannelError as exc:
            log(f"channel: {exc}; the session ends")
            self.end_session()
            self._writer().send(abort_notice())
            return channel.unread
        self._feed_frames(plaintext)
        return b""

    def _feed_frames(self, data: bytes) -> None:
        while True:
            error: FrameError | None = None
            try:
                frames = self.decoder.feed(data)
            except FrameError as exc:
                error, frames = exc, exc.frames  # act on the good frames before the bad one
            for frame in frames:
                self._handle(frame)
            if error is None:
                return
            session = self.session or Session(self.agent, self._writer(self.channel))
            session.protocol_error(f"malformed frame: {error}")
            self.session = None
            if self.channel is not None:  # an authenticated host broke the protocol
                self.end_session()
                return
            self.decoder.resync()
            data = b""  # hunt through what is already buffered

    def _handle(self, frame: Frame) -> None:
        if frame.type == FrameType.HELLO:
            if self.session is not None:
                self.session.close()
            self.session = Session(self.agent, self._writer(self.channel))
            self.session.hello(frame)
        elif self.session is not None:
            self.session.handle(frame)
        # else: the rest of a session that ended in a protocol error, until the next HELLO
        if self.session is not None and self.session.broken:
            self.session = None

    def end_session(self) -> None:
        """End the session, and the channel session it ran in."""
        if self.session is not None:
            self.session.close()
            self.session = None
        self.channel = None
        self.responder = None


def _hangup_poller(fd: int) -> select.poll:
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are reported regardless
    return poller


def _read(fd: int, *, log_errors: bool) -> bytes:
    """The next bytes of the connection; b"" at its end or on an error."""
    try:
        return os.read(fd, READ_SIZE)
    except OSError as exc:
        if log_errors:
            log(f"reading the connection failed: {exc}")
        return b""


class Agent:
    """The agent: its reaper, its transfer window and its channel secret.

    ``secret`` (32 bytes) makes every connection the encrypted channel; None (only a local
    test agent, or a VM the host booted with ``warden.channel=plain``) serves plaintext
    frames. A HELLO may hand over a new secret (:attr:`secret`) for later handshakes.
    ``on_handshake`` is called with each handshake message before it is answered.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        on_handshake: Callable[[bytes], object] | None = None,
    ) -> None:
        self.secret = secret
        self.on_handshake = on_handshake
        self.reaper = Reaper()
        self.xfer: XferWindow | None = find_xfer() if os.getpid() == 1 else None
        # Load subprocess and ctypes while the host is still connecting, not in a request.
        threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()

    def serve_fd(
        self,
        fd: int,
        *,
        reconnect: bool,
        poll_writes: bool = False,
    ) -> bool:
        """Serve the connection on ``fd``. Returns True if the host asked for a shutdown.

        Without ``reconnect``, EOF ends it. With it (the virtio port), EOF means the host side
        disconnected: the session is reset and the agent waits for the next host on the same fd.

        The port gives EOF only once its buffer is empty, though. A host that dies while the
        agent is busy with its requests leaves bytes there, and the next host (a manager
        restarted after kill -9) may connect before they are read. So with ``poll_writes`` the
        port is also asked after every read whether the host is gone: if so, the session ends
        and the rest of the old stream is skipped by the next connection's hunt for a HELLO.
        """
        lock = threading.Lock()
        connection: Connection | None = None
        hangup = _hangup_poller(fd) if poll_writes else None
        try:
            while True:
                data = _read(fd, log_errors=not reconnect)
                gone = not data or (hangup is not None and _hung_up(hangup))
                if connection is not None and gone:
                    connection.end_session()
                    connection = None
                if not data:
                    if not reconnect:
                        return False
                    time.sleep(IDLE_POLL)
                    continue
                if connection is None:
                    connection = Connection(self, fd, lock, poll_writes=poll_writes)
                connection.feed(data)
        except Shutdown:
            return True
        finally:
            if connection is not None:
                connection.end_session()

    def serve_port(self, fd: int) -> None:
        """Serve the virtio port ``fd`` until the host asks for a shutdown."""
        while True:
            try:
                if self.serve_fd(fd, reconnect=True, poll_writes=True):
                    return
            except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                log_exception("serve")
                time.sleep(0.1)

    def serve_listen(self, path: str) -> None:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            # Bound and listening under a temp name first: the path appears only once a
            # connection to it is accepted, never refused.
            pending = f"{path}.{os.getpid()}.tmp"
            server.bind(pending)
            try:
                server.listen(1)
                os.rename(pending, path)
            except BaseException:
                os.unlink(pending)
                raise
            try:
                while True:
                    conn, _ = server.accept()
                    with conn:
                        if self.serve_fd(conn.fileno(), reconnect=False):
                            return
            finally:
                os.unlink(path)


def _warm_up() -> None:
    import ctypes
    import subprocess

    del subprocess, ctypes
