"""Writing whole frames to the connection.

A DATA frame's header and payload are sent as they are, never joined (under TCG that copy
alone cost the guest, the bottleneck, ~0.6 s of CPU per 256 MiB of output). A large frame to
the virtio port goes through a staging pipe and splice(2), which costs the guest less than
``write``:

- ``write`` on the port (``port_fops_write`` in drivers/char/virtio_console.c) takes at most
  32 KiB per call: a 256 KiB DATA frame is 8 calls, each a kmalloc'd bounce buffer, a copy from
  user space and a virtqueue kick (an MMIO exit under TCG).
- The frame is instead written once into a pipe only the writer uses, then spliced to the port:
  ``port_fops_splice_write`` puts the pipe's pages into one descriptor chain with one kick, and
  ``pipe_to_sg`` takes each page over without copying it (``anon_pipe_buf_try_steal``: the pipe
  is the page's only owner).

Why not splice a command's stdout pipe straight to the port (zero copies)? Two traps in this
kernel (6.1) make that unsafe:

- ``port_fops_splice_write`` sizes its scatterlist by the pipe's occupancy (``sg_init_table``
  marks its last slot as the end), but ``virtqueue_add_split`` walks the list to that end
  mark, not to the count filled. Splicing less than *all* of a pipe therefore queues
  zero-length descriptors, and QEMU then stops the device ("virtio: zero sized buffers are not
  allowed"): the agent's channel is dead. A command keeps writing into its pipe, so its pipe
  never holds exactly one frame.
- ``pipe_write`` leaves an empty buffer in the ring when a write faults, which an unprivileged
  command can do at will; ``pipe_to_sg`` would queue it as a zero-length descriptor too.

The staging pipe has neither: only this writer fills it (from valid memory, so no empty
buffers), and every splice asks for all it holds. A spliced frame's pages stay with the
virtqueue until QEMU has passed them to the host; the streams' credit bounds how many bytes
that is, as it bounds the bounce buffers of ``write``.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import weakref

from warden.channel.errors import ChannelError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from warden.channel.transport import Session as ChannelSession

STAGE_MIN = 32 * 1024
"""Frames larger than this are staged and spliced: ``port_fops_write``'s cap per write."""
STAGE_SIZE = 512 * 1024
"""The staging pipe's capacity: a 256 KiB DATA frame (and its header) in one splice."""


class Writer:
    """Writes whole frames to the connection; one per session, sharing the fd's lock.

    Once dead (the session ended), every send is dropped. With ``poll_first`` (the virtio port)
    it waits for POLLOUT before each write: the port reports POLLHUP instead while the host is
    disconnected, and a plain write would block until the next host connects and then send it
    stale bytes.
    """

    def __init__(
        self,
        fd: int,
        lock: threading.Lock,
        *,
        poll_first: bool,
        channel: ChannelSession | None = None,
    ) -> None:
        self.fd = fd
        self.channel = channel
        """The channel session whose records carry the frames (None: plaintext)."""
        self.lock = lock
        self.dead = False
        self._stage: tuple[int, int] | None = None
        """The staging pipe (read end, write end), made at the first large frame."""
        self._finalizer: weakref.finalize[[tuple[int, ...]], Writer] | None = None
        """Closes the staging pipe: at :meth:`close`, or once the writer is garbage."""
        self._can_stage = True
        """False once the fd refused splice (EINVAL) or no pipe could be made."""
        self._poller: select.poll | None = None
        if poll_first:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLOUT)

    def send(self, data: bytes, payload: bytes = b"") -> bool:
        """Send one frame: ``data`` (a header, or a whole frame) followed by ``payload``."""
        with self.lock:
            try:
                if self.dead:
                    return False
                if self.channel is not None:  # sealed under the lock: records go out in order
                    data, payload = self.channel.seal(data + payload), b""
                if len(data) + len(payload) > STAGE_MIN and self._can_stage and self._staging():
                    return self._send_staged(data, payload)
                return self._write_all(data) and self._write_all(payload)
            except (OSError, ChannelError):
                self.dead = True
                return False
            finally:
                if self.dead:  # a pipe left mid-frame is never used again
                    self._release()

    @property
    def encrypted(self) -> bool:
        return self.channel is not None

    def close(self) -> None:
        """Drop every later send (the session ended), and release the staging pipe.

        Never waits for the lock: a sender holding it may be blocked in the port until a host
        connects. That sender releases the pipe instead, on its way out.
        """
        self.dead = True
        if self.lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self.lock.release()

    def _release(self) -> None:
        if self._finalizer is not None:
            self._stage = None
            self._finalizer()

    def _staging(self) -> bool:
        """Make the staging pipe if needed; False if none can be made."""
        if self._stage is not None:
            return True
        import fcntl

        try:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
        except OSError:
            self._can_stage = False
            return False
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, STAGE_SIZE)
            os.set_blocking(write_end, False)  # a full pipe must not block its only reader
        except OSError:
            os.close(read_end)
            os.close(write_end)
            self._can_stage = False
            return False
        self._stage = (read_end, write_end)
        self._finalizer = weakref.finalize(self, _close_all, self._stage)
        return True

    def _send_staged(self, data: bytes, payload: bytes) -> bool:
        """Write the frame into the staging pipe and splice it on; False once the host is gone.

        The pipe is empty between frames, and each splice asks for all it holds (see the
        module's doc for why it must). Call with the lock held.
        """
        assert self._stage is not None
        read_end, write_end = self._stage
        pieces = [memoryview(p) for p in (data, payload) if p]
        staged = 0  # bytes in the pipe
        while pieces or staged:
            if pieces:
                try:
                    written = os.writev(write_end, pieces)
                except BlockingIOError:  # full: splice some out first
                    written = 0
                staged += written
                pieces = _advance(pieces, written)
            if not self._writable():
                return False
            moved = self._move_staged(read_end, staged)
            if moved is None:
                return False
            if moved <= 0:
                raise OSError(errno.EIO, "the staging pipe ran dry")
            staged -= moved
        return True

    def _move_staged(self, read_end: int, staged: int) -> int | None:
        """Move up to the ``staged`` bytes of the pipe on to the fd: how many it moved, or None
        once the host is gone."""
        if self._can_stage:
            try:
                return os.splice(read_end, self.fd, staged)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._can_stage = False  # no splice_write: write from now on
        chunk = os.read(read_end, staged)
        return len(chunk) if self._write_all(chunk) else None

    def _writable(self) -> bool:
        """Wait until the fd takes bytes; False (and dead) once the host is gone."""
        if self._poller is not None:
            events = self._poller.poll()
            if events and not events[0][1] & select.POLLOUT:
                self.dead = True  # POLLHUP/POLLERR: the host went away
                return False
        return not self.dead

    def _write_all(self, data: bytes) -> bool:
        """Write all of ``data``; False once the host is gone. Call with the lock held."""
        view = memoryview(data)
        while view:
            if not self._writable():
                return False
            written = os.write(self.fd, view)
            view = view[written:]
        return True


def _advance(pieces: list[memoryview], count: int) -> list[memoryview]:
    """What is left of ``pieces`` after the first ``count`` bytes."""
    while pieces and count >= len(pieces[0]):
        count -= len(pieces.pop(0))
    if count:
        pieces[0] = pieces[0][count:]
    return pieces


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
