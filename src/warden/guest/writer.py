"""Writing whole frames to the connection."""

from __future__ import annotations

import os
import select
import threading


class Writer:
    """Writes whole frames to the connection; one per session, sharing the fd's lock.

    Once dead (the session ended), every send is dropped. With ``poll_first`` (the virtio port)
    it waits for POLLOUT before each write: the port reports POLLHUP instead while the host is
    disconnected, and a plain write would block until the next host connects and then send it
    stale bytes.
    """

    def __init__(self, fd: int, lock: threading.Lock, *, poll_first: bool) -> None:
        self.fd = fd
        self.lock = lock
        self.dead = False
        self._poller: select.poll | None = None
        if poll_first:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLOUT)

    def send(self, data: bytes) -> bool:
        with self.lock:
            if self.dead:
                return False
            view = memoryview(data)
            try:
                while view:
                    if self._poller is not None:
                        events = self._poller.poll()
                        if events and not events[0][1] & select.POLLOUT:
                            self.dead = True  # POLLHUP/POLLERR: the host went away
                            return False
                    if self.dead:
                        return False
                    written = os.write(self.fd, view)
                    view = view[written:]
            except OSError:
                self.dead = True
                return False
        return True
