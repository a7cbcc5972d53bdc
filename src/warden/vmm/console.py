"""A VM's serial console, capped on disk: QEMU serves it on a unix socket, the host reads it.

QEMU's ``-chardev file`` has no size limit, and a guest that writes ``/dev/ttyS0`` in a loop
grows it by about 180 KB/s. So QEMU serves the console on a socket (``server=on,wait=on``: QEMU
waits for the host before it starts the guest, so no boot message is lost), and the owner of the
VM (the embedded process's event loop, or the daemon) reads it into :class:`ConsoleLog`: two
files, ``console.log`` and ``console.log.1``, each at most half of CONSOLE_LOG_MAX. When the
current file is full it becomes ``.1`` (the older half is dropped), so the newest output is
always kept. A reader that falls behind slows only the guest's console: QEMU retries and then
drops characters, it never buffers them. While no host is connected (a daemon restarting) QEMU
drops the output; the next daemon connects again (``Machine.attach``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

_log = logging.getLogger(__name__)

CONSOLE_LOG_MAX = 1 << 20
"""The most console output kept on disk per VM, in bytes (both halves together)."""

READ_SIZE = 64 * 1024
TAIL_BYTES = 16 * 1024
"""How much of the end of the log ``tail`` reads: enough for the lines anyone asks for."""


class ConsoleLog:
    """The on-disk console log of one VM: ``path`` and ``path.1``, at most ``cap`` bytes."""

    def __init__(self, path: Path, cap: int = CONSOLE_LOG_MAX) -> None:
        if cap < 2:
            raise ValueError("the console log cap must be at least 2 bytes")
        self.path = path
        self.old = path.with_name(path.name + ".1")
        self.half = cap // 2
        self._fd: int | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating so that neither file passes half the cap."""
        view = memoryview(data)
        while view:
            fd = self._open()
            if self._size >= self.half:
                self._rotate()
                fd = self._open()
            piece = view[: self.half - self._size]
            written = os.write(fd, piece)
            self._size += written
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines of the log (of its last TAIL_BYTES), "" if none."""
        data = _last_bytes(self.path, TAIL_BYTES)
        if len(data) < TAIL_BYTES:
            data = _last_bytes(self.old, TAIL_BYTES - len(data)) + data
        text = data.decode(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""

    def _open(self) -> int:
        if self._fd is None:
            # 0600: the console shows whatever the guest prints. Appending keeps what an
            # earlier manager of this VM wrote.
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.old)
        self._size = 0


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(sock: Path, deadline: float) -> Stream:
    """Connect to QEMU's console socket, retrying until it accepts or ``deadline`` passes.

    The host never writes to it (and never half-closes it: QEMU would take that as a hang-up).
    """
    while True:
        try:
            return await asyncio.open_unix_connection(str(sock))
        except OSError:  # not there yet, or not listening yet: QEMU is starting
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


async def pump(stream: Stream, log: ConsoleLog) -> None:
    """Copy the console into ``log`` until QEMU closes it (it exited) or this is cancelled."""
    reader, writer = stream
    failed = False
    try:
        while data := await reader.read(READ_SIZE):
            if failed:
                continue  # keep draining, so the guest's console never stalls on us
            try:
                log.write(data)
            except OSError as exc:
                failed = True
                _log.warning("console log %s: %s; dropping console output from now", log.path, exc)
    except ConnectionError:
        pass
    finally:
        log.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _last_bytes(path: Path, count: int) -> bytes:
    if count <= 0:
        return b""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - count))
            return f.read(count)
    except OSError:
        return b""
