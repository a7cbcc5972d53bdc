"""Reaping: as PID 1 the agent collects every child's exit status, and dispatches it by pid."""

from __future__ import annotations

import os
import threading
import time

from warden.guest.log import log_exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class Reaper:
    """Collects every child's exit status (the agent may be PID 1) and dispatches it by pid.

    Spawn while holding :attr:`lock` and :meth:`register` the pid before releasing it, so a
    child that exits at once is never mistaken for an unknown one.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._wake = threading.Event()
        self._wake.set()  # collect anything inherited at boot
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def register(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(wait_status)`` when ``pid`` exits. Caller holds :attr:`lock`."""
        self._waiters[pid] = callback
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break  # no children left; sleep until the next spawn
                except OSError:
                    log_exception("reaper")
                    time.sleep(0.1)
                    break
                with self.lock:
                    callback = self._waiters.pop(pid, None)
                if callback is not None:
                    try:
                        callback(status)
                    except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                        log_exception("reaper callback")
