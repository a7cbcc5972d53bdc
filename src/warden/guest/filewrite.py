"""``write``: DATA on channel FILE (or transfer-window references on XFER) into a temp file in
the target dir, renamed over the target at EOF. Runs on the main thread, as the request's user.
"""

from __future__ import annotations

import contextlib
import os

from warden.guest.args import arg_bool, arg_mode, arg_path, failure, file_error
from warden.guest.request import Request
from warden.guest.users import acting_as
from warden.wire.frame import Channel, FrameError, decode_xfer_ref, xfer_ref_tag
from warden.wire.ops import ErrorKind, Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from warden.guest.session import Session
    from warden.guest.users import Account
    from warden.wire.frame import Frame


class WriteFile(Request):
    def __init__(
        self, session: Session, request_id: int, args: dict[str, Any], account: Account
    ) -> None:
        super().__init__(session, request_id)
        self.path = arg_path(args)
        self.mode = arg_mode(args, 0o644)
        self.parents = arg_bool(args, Key.PARENTS, False)
        self.account = account
        self.size = 0
        self.fd = -1
        self.tmp = ""

    def start(self) -> bool:
        """Open the temp file; answer at once and return False if that fails."""
        directory, name = os.path.split(self.path)
        try:
            if not name:
                raise IsADirectoryError(21, "Is a directory", self.path)
            self.tmp = os.path.join(directory, f".{name}.warden-{os.urandom(6).hex()}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with acting_as(self.account):
                if self.parents:
                    os.makedirs(directory, exist_ok=True)
                self.fd = os.open(self.tmp, flags, 0o600)
        except OSError as exc:
            self.session.respond(self.request_id, file_error("write", self.path, exc))
            return False
        return True

    def on_data(self, frame: Frame) -> None:
        if frame.channel == Channel.XFER:
            self._on_xfer(frame)
            return
        if frame.channel != Channel.FILE or self.fd < 0:
            return
        self._write(memoryview(frame.payload))

    def _on_xfer(self, frame: Frame) -> None:
        """Copy a piece of the transfer window into the file. Always acknowledged."""
        try:
            xfer = self.session.agent.xfer
            if self.fd < 0:
                return
            if xfer is None:
                self._discard()
                self.finish(failure(ErrorKind.INVALID, "no transfer window here"))
                return
            try:
                view = xfer.read(*decode_xfer_ref(frame.payload))
            except (OSError, FrameError) as exc:
                self._discard()
                self.finish(failure(ErrorKind.IO, f"transfer window: {exc}"))
                return
            try:
                problem = self._check_piece(view, xfer_ref_tag(frame.payload))
            except Exception as exc:  # noqa: BLE001 - the request fails, the agent goes on
                problem = f"the piece could not be checked ({type(exc).__name__}: {exc})"
            if problem is not None:
                self._discard()
                self.finish(failure(ErrorKind.INVALID, f"transfer window: {problem}"))
                return
            self._write(view)
        finally:
            self.session.send_data(self.request_id, Channel.XFER, frame.payload)

    def _check_piece(self, view: memoryview, tag: bytes) -> str | None:
        """On the encrypted channel, whether the piece is the one the host tagged for this
        request at this place (``warden.channel.window``); what is wrong, if not."""
        sequence = self.session.piece
        window = self.session.window
        if window is None:
            if self.session.writer.encrypted:
                return "no window key in this session"
            return "a tag on a plaintext channel" if tag else None
        if not tag or not window.check(self.request_id, sequence, view, tag):
            return (
                f"piece {sequence} failed authentication: the window's bytes were altered, "
                "swapped or replayed; nothing was written"
            )
        return None

    def _write(self, view: memoryview) -> None:
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self._discard()
            self.finish(file_error("write", self.path, exc))

    def on_eof(self, frame: Frame) -> None:
        if frame.channel != Channel.FILE or self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            with acting_as(self.account):
                try:
                    os.fchmod(fd, self.mode)
                finally:
                    os.close(fd)
                os.rename(self.tmp, self.path)
        except OSError as exc:
            self._unlink_tmp()
            self.finish(file_error("write", self.path, exc))
            return
        self.finish({Key.OK: True, Key.SIZE: self.size})

    def cancel(self) -> None:
        if self.fd >= 0:
            self._discard()
            self.finish(failure(ErrorKind.CANCELLED, "write cancelled"))

    def _discard(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        with contextlib.suppress(OSError), acting_as(self.account):
            os.unlink(self.tmp)
