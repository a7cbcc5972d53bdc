"""Flow control of what the agent sends: the credit of one stream.

Each guest-sent stream of a request (stdout, stderr, a file read) starts with
``INITIAL_WINDOW`` bytes of credit; every DATA frame spends its length, and the host's WINDOW
frames grant more. A sender with no credit stops reading its pipe or file until a WINDOW
arrives, so a producer faster than the host's consumer blocks instead of being buffered.
"""

from __future__ import annotations

import threading

from warden.wire.frame import FrameError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_CREDIT = (1 << 31) - 1
"""More outstanding credit than this is a protocol error (as in HTTP/2)."""


class Credit:
    """How many bytes one stream may still send. One thread spends, any thread grants."""

    __slots__ = ("_available", "_closed", "_cond", "_wake")

    def __init__(self, initial: int, wake: Callable[[], None] | None = None) -> None:
        self._available = initial
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._wake = wake

    @property
    def available(self) -> int:
        return self._available

    def spend(self, n: int) -> None:
        """Account for ``n`` bytes sent; never more than :attr:`available`."""
        with self._cond:
            if n > self._available:
                raise RuntimeError(f"sending {n} bytes with a credit of {self._available}")
            self._available -= n

    def grant(self, increment: int) -> None:
        """A WINDOW frame's increment. Raises FrameError past :data:`MAX_CREDIT`."""
        with self._cond:
            if self._available + increment > MAX_CREDIT:
                raise FrameError(
                    f"a WINDOW of {increment} bytes raises the credit past {MAX_CREDIT}"
                )
            was_empty = self._available == 0
            self._available += increment
            self._cond.notify_all()
        if was_empty and self._wake is not None:
            self._wake()

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for some credit; the credit then (0 if closed or none)."""
        with self._cond:
            if self._available == 0 and not self._closed:
                self._cond.wait(timeout)
            return 0 if self._closed else self._available

    def close(self) -> None:
        """Wake a waiting sender for good (the request was cancelled or its session ended)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._wake is not None:
            self._wake()
