"""``read``: a guest file streamed to the host as DATA on channel FILE, then EOF and the size.

With ``xfer``: true (a host that lent slots of the transfer window to the read), the pieces of
the file go through the window instead: each is read into a buffer of the read's own, written
into a slot the host lent (O_DIRECT), and referenced on XFER_READ with its tag
(``Session.send_piece``). A slot is used once, until the host lends it again (once it took the
piece). A piece shorter than ``XFER_MIN`` (the end of a small file, a short read of a pipe)
goes inline as DATA, within the stream's credit.
"""

from __future__ import annotations

import os
import queue
import threading

from warden.guest.args import arg_bool, arg_path, failure, file_error
from warden.guest.log import log_exception
from warden.guest.request import Request
from warden.guest.users import acting_as
from warden.wire.frame import XFER_MAX_LENGTH, Channel, FrameError, decode_xfer_ref
from warden.wire.ops import ErrorKind, Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from warden.guest.session import Session
    from warden.guest.users import Account
    from warden.guest.xfer import XferWindow
    from warden.wire.frame import Frame

CHUNK = 256 * 1024
"""The largest DATA payload of a file read."""
CREDIT_POLL = 1.0
"""How often a read waiting for credit (or a slot) checks whether it was cancelled."""
XFER_MIN = 64 * 1024
"""Pieces shorter than this go inline in DATA frames; longer ones through the window."""


class ReadFile(Request):
    def __init__(
        self, session: Session, request_id: int, args: dict[str, Any], account: Account
    ) -> None:
        super().__init__(session, request_id)
        self.path = arg_path(args)
        self.account = account
        self.cancelled = False
        self.credit = self.new_credit(Channel.FILE)
        self.window = arg_bool(args, Key.XFER, False) and session.window_reads()
        self.slots: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        """Slots of the window the host lent to this read: (offset, size); None: cancelled."""

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"read-{self.request_id}", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled = True
        self.close_credits()
        self.slots.put(None)

    def on_data(self, frame: Frame) -> None:
        """A slot of the window lent to this read (checked against the window's size)."""
        xfer = self.session.agent.xfer
        if frame.channel != Channel.XFER_READ or xfer is None:
            return
        offset, length = decode_xfer_ref(frame.payload)  # FrameError: a protocol error
        if offset + length > xfer.size:
            raise FrameError(f"a slot of {length} bytes at {offset} is beyond the window")
        self.slots.put((offset, length))

    def _run(self) -> None:
        try:
            self.finish(self._stream())
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            log_exception("read")
            self.finish(failure(ErrorKind.AGENT, "internal error in read"))

    def _stream(self) -> dict[str, Any]:
        try:
            with acting_as(self.account):
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return file_error("read", self.path, exc)
        try:
            xfer = self.session.agent.xfer
            if self.window and xfer is not None:
                size = self._send_window(fd, xfer)
            else:
                size = self._send_all(fd)
        except OSError as exc:
            return file_error("read", self.path, exc)
        finally:
            os.close(fd)
        if size < 0:
            return failure(ErrorKind.CANCELLED, "read cancelled")
        self.session.send_eof(self.request_id, Channel.FILE)
        return {Key.OK: True, Key.SIZE: size}

    def _send_all(self, fd: int) -> int:
        """Send the file within the credit; its size, or -1 if cancelled or disconnected."""
        size = 0
        credit = self.credit
        while True:
            allowed = credit.available
            if allowed == 0 and _at_end(fd, size):
                return size  # no need to wait for credit to find the end
            while allowed == 0 and not self.cancelled:
                allowed = credit.wait(CREDIT_POLL)
            if self.cancelled:
                return -1
            chunk = os.read(fd, min(CHUNK, allowed))
            if not chunk:
                return size
            size += len(chunk)
            if not self.send(Channel.FILE, credit, chunk):
                return -1

    def _send_window(self, fd: int, xfer: XferWindow) -> int:
        """Send the file through the slots the host lends; its size, or -1 if cancelled."""
        import mmap

        buffer = mmap.mmap(-1, XFER_MAX_LENGTH)  # page-aligned, as O_DIRECT needs
        size = 0
        while True:
            slot = self._next_slot(fd, size)
            if slot is None:
                return -1 if self.cancelled else size
            offset, room = slot
            length = os.readv(fd, [memoryview(buffer)[: min(room, XFER_MAX_LENGTH)]])
            if length < XFER_MIN:
                self.slots.put(slot)  # not used: still lent to this read
                if not length or not self._send_inline(memoryview(buffer)[:length]):
                    return size if not length else -1
            else:
                if not xfer.write(offset, buffer, length, lambda: self.cancelled):
                    return -1
                if not self.session.send_piece(
                    self.request_id, offset, memoryview(buffer)[:length]
                ):
                    return -1
            size += length

    def _next_slot(self, fd: int, size: int) -> tuple[int, int] | None:
        """The next lent slot; None if cancelled, or at the end of the file with none lent."""
        while not self.cancelled:
            try:
                return self.slots.get_nowait()
            except queue.Empty:
                pass
            if _at_end(fd, size):
                return None
            try:
                return self.slots.get(timeout=CREDIT_POLL)
            except queue.Empty:
                continue
        return None

    def _send_inline(self, view: memoryview) -> bool:
        """Send ``view`` as DATA within the stream's credit; False if cancelled or gone."""
        credit = self.credit
        while view:
            allowed = credit.available
            while allowed == 0 and not self.cancelled:
                allowed = credit.wait(CREDIT_POLL)
            if self.cancelled:
                return False
            chunk, view = bytes(view[: min(CHUNK, allowed)]), view[min(CHUNK, allowed) :]
            if not self.send(Channel.FILE, credit, chunk):
                return False
        return True


def _at_end(fd: int, offset: int) -> bool:
    """Whether a seekable file has nothing at ``offset`` (False when it cannot tell)."""
    try:
        return os.pread(fd, 1, offset) == b""
    except OSError:  # ESPIPE: a pipe or a device
        return False
