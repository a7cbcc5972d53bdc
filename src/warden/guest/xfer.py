"""The guest's side of the transfer window: a virtio-blk disk the host writes pieces into (file
writes), and the agent writes pieces into for the host (file reads, in slots the host lent)."""

from __future__ import annotations

import os
import threading

from warden.guest.log import log
from warden.wire.frame import XFER_MAX_LENGTH, XFER_SERIAL

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable

QUIESCE_S = 5.0
"""How long a new session waits for the window writes of the sessions before it."""


class XferWindow:
    """The guest's side of the transfer window: O_DIRECT reads into one aligned buffer, and
    O_DIRECT writes from the buffers of file reads.

    Only the session's reader thread calls :meth:`read`, so one buffer serves every request.
    """

    def __init__(self, device: str) -> None:
        import mmap

        try:
            self.fd = os.open(device, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            self.writable = True
        except OSError as exc:
            log(f"the transfer window {device} is read-only ({exc}): reads stream instead")
            self.fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            self.writable = False
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, XFER_MAX_LENGTH)
        self._writes = threading.Condition(threading.Lock())
        self._writing = 0
        """Writes into the window in progress (by the threads of file reads)."""

    def read(self, offset: int, length: int) -> memoryview:
        if offset + length > self.size:
            raise OSError(f"reference past the end of the window ({self.size} bytes)")
        span = -(-length // 512) * 512  # O_DIRECT reads whole sectors
        done = os.preadv(self.fd, [memoryview(self.buffer)[:span]], offset)
        if done < length:
            raise OSError(f"short read from the window: {done} of {length} bytes")
        return memoryview(self.buffer)[:length]

    def write(
        self, offset: int, buffer: mmap.mmap, length: int, cancelled: Callable[[], bool]
    ) -> bool:
        """Write the first ``length`` bytes of ``buffer`` (page-aligned, an mmap) at ``offset``,
        padded with zeros to whole sectors (O_DIRECT writes them), within the window. False
        (nothing written) if the read was ``cancelled()``: its session ended, and the slot may
        be the next host's."""
        span = -(-length // 512) * 512
        if offset < 0 or offset % 512 or offset + span > self.size or span > len(buffer):
            raise OSError(f"a piece of {length} bytes at {offset} does not fit the window")
        view = memoryview(buffer)
        view[length:span] = bytes(span - length)
        with self._writes:
            if cancelled():
                return False
            self._writing += 1
        try:
            done = os.pwritev(self.fd, [view[:span]], offset)
        finally:
            with self._writes:
                self._writing -= 1
                self._writes.notify_all()
        if done < span:
            raise OSError(f"short write to the window: {done} of {span} bytes")
        return True

    def quiesce(self, timeout: float = QUIESCE_S) -> None:
        """Wait until no write into the window is in progress. A new session calls it before
        it answers its HELLO: the reads of the sessions before it were cancelled, and none of
        them may write into a slot once the next host may use it."""
        with self._writes:
            if not self._writes.wait_for(lambda: self._writing == 0, timeout):
                log(f"a write into the transfer window still runs after {timeout:g}s")


def find_xfer() -> XferWindow | None:
    """The transfer window disk, found by its serial; None where there is none."""
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/sys/block/{name}/serial", encoding="ascii", errors="replace") as f:
                serial = f.read().strip()
        except OSError:
            continue
        if serial == XFER_SERIAL:
            try:
                return XferWindow(f"/dev/{name}")
            except OSError as exc:
                log(f"cannot open the transfer window /dev/{name}: {exc}")
    return None
