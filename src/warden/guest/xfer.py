"""The guest's side of the transfer window: a virtio-blk disk the host writes pieces into."""

from __future__ import annotations

import os

from warden.guest.log import log
from warden.wire.frame import XFER_MAX_LENGTH, XFER_SERIAL


class XferWindow:
    """The guest's side of the transfer window: O_DIRECT reads into one aligned buffer.

    Only the session's reader thread calls :meth:`read`, so one buffer serves every request.
    """

    def __init__(self, device: str) -> None:
        import mmap

        self.fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, XFER_MAX_LENGTH)

    def read(self, offset: int, length: int) -> memoryview:
        if offset + length > self.size:
            raise OSError(f"reference past the end of the window ({self.size} bytes)")
        span = -(-length // 512) * 512  # O_DIRECT reads whole sectors
        done = os.preadv(self.fd, [memoryview(self.buffer)[:span]], offset)
        if done < length:
            raise OSError(f"short read from the window: {done} of {length} bytes")
        return memoryview(self.buffer)[:length]


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
