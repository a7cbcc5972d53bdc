"""``read``: a guest file streamed to the host as DATA on channel FILE, then EOF and the size."""

from __future__ import annotations

import os
import threading

from warden.guest.args import arg_path, failure, file_error
from warden.guest.log import log_exception
from warden.guest.request import Request
from warden.guest.users import acting_as
from warden.wire.frame import Channel
from warden.wire.ops import ErrorKind, Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from warden.guest.session import Session
    from warden.guest.users import Account

CHUNK = 256 * 1024
"""The largest DATA payload of a file read."""
CREDIT_POLL = 1.0
"""How often a read waiting for credit checks whether it was cancelled."""


class ReadFile(Request):
    def __init__(
        self, session: Session, request_id: int, args: dict[str, Any], account: Account
    ) -> None:
        super().__init__(session, request_id)
        self.path = arg_path(args)
        self.account = account
        self.cancelled = False
        self.credit = self.new_credit(Channel.FILE)

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"read-{self.request_id}", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled = True
        self.close_credits()

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


def _at_end(fd: int, offset: int) -> bool:
    """Whether a seekable file has nothing at ``offset`` (False when it cannot tell)."""
    try:
        return os.pread(fd, 1, offset) == b""
    except OSError:  # ESPIPE: a pipe or a device
        return False
