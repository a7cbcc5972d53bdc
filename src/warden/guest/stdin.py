"""A command's stdin: DATA frames queued by the main thread, written to the pipe by a thread.

The protocol has no flow control of what the host sends, and the main thread must never block
(it also reads the WINDOW frames that let the command's output, and so the command, go on). So
the queue is bounded instead: a command that leaves more than :data:`MAX_QUEUED` bytes of its
input unread is stopped, and its exec fails with a message that says so.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque

from warden.guest.log import log_exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_QUEUED = 32 << 20
"""The most stdin bytes the agent holds for one command."""


class StdinQueue:
    """Bytes for the command's stdin; ``None`` marks the end. Bounded by :data:`MAX_QUEUED`."""

    def __init__(self) -> None:
        self._items: deque[bytes | None] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.queued = 0
        self.overflowed = False

    def put(self, item: bytes | None) -> bool:
        """Queue ``item``; False (and nothing queued) if that would pass the bound."""
        with self._cond:
            if item is not None:
                if self.queued + len(item) > MAX_QUEUED:
                    self.overflowed = True
                    return False
                self.queued += len(item)
            self._items.append(item)
            self._cond.notify()
        return True

    def get(self) -> bytes | None:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if item is not None:
                self.queued -= len(item)
            return item


def feed(queue: StdinQueue, fd: int, stopped: Callable[[], bool]) -> None:
    """Write what ``queue`` holds to the pipe ``fd`` until its end; close ``fd``.

    Once the command closed its stdin, or ``stopped()`` (the command ended or was killed), the
    rest is read from the queue and dropped.
    """
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    broken = False
    try:
        while True:
            item = queue.get()
            if item is None:
                break
            view = memoryview(item)
            while view and not broken:
                if stopped():
                    broken = True
                    break
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    poller.poll(1000)
                except OSError:  # EPIPE: the process closed stdin
                    broken = True
    except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
        log_exception("stdin")
    finally:
        os.close(fd)
