"""Streaming a command's stdout and stderr to the host, within each stream's credit.

One thread polls both pipes. A stream whose credit is spent is taken out of the poll, so its
pipe fills and the command blocks on its next write: real backpressure. A WINDOW frame that
refills an empty credit wakes the poll through the exec's eventfd.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from warden.guest.exec import Exec

CHUNK = 256 * 1024
"""The most the agent reads from a pipe at once (and the largest DATA payload it sends)."""
PIPE_SIZE = 1 << 20
"""The capacity asked for the stdout and stderr pipes (fewer, larger reads)."""
KILL_GRACE = 2.0
"""After a kill, how long to keep draining pipes that escaped processes may still hold."""


def enlarge(fd: int) -> None:
    """Ask for a larger pipe buffer; the default stays if the kernel refuses."""
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _limit(ex: Exec, deadline: float | None) -> float | None:
    return ex.killed_at + KILL_GRACE if ex.killed_at is not None else deadline


def _poll_set(ex: Exec, poller: select.poll, streams: dict[int, int], polled: set[int]) -> None:
    """Poll exactly the pipes whose stream has credit."""
    for fd, channel in streams.items():
        has_credit = ex.credits[channel].available > 0
        if has_credit and fd not in polled:
            poller.register(fd, select.POLLIN)
            polled.add(fd)
        elif not has_credit and fd in polled:
            poller.unregister(fd)
            polled.discard(fd)


def pump(ex: Exec, streams: dict[int, int], deadline: float | None) -> None:
    """Stream the pipes (fd -> channel) until all close, or a kill's grace period passes."""
    poller = select.poll()
    poller.register(ex.wake_fd, select.POLLIN)
    polled: set[int] = set()
    try:
        while streams:
            _poll_set(ex, poller, streams, polled)
            now = time.monotonic()
            limit = _limit(ex, deadline)
            if limit is not None and now >= limit:
                if ex.killed_at is None:
                    ex.timed_out = True
                    ex.kill()
                    continue
                break  # killed, but something that escaped still holds a pipe
            # Wake at least once a second to notice a cancel that left the pipes open.
            wait_ms = 1000 if limit is None else min(1000, int((limit - now) * 1000) + 1)
            for fd, _events in poller.poll(wait_ms):
                if fd == ex.wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                elif not _read_one(ex, fd, streams[fd]):
                    poller.unregister(fd)
                    polled.discard(fd)
                    os.close(fd)
                    ex.eofs.append(streams.pop(fd))  # sent with the response, in one send
    finally:
        for fd, channel in streams.items():
            os.close(fd)
            ex.session.send_eof(ex.request_id, channel)


def _read_one(ex: Exec, fd: int, channel: int) -> bool:
    """Read and send one piece of a pipe, within its credit; False at its end."""
    credit = ex.credits[channel]
    allowed = min(CHUNK, credit.available)
    if allowed == 0:
        return True
    try:
        data = os.read(fd, allowed)
    except OSError:
        data = b""
    if not data:
        return False
    ex.send(channel, credit, data)
    return True
