"""Auto-pause: a VM with no request in flight for ``idle_s`` seconds is stopped (QMP ``stop``).

Every request to a VM's agent passes its :class:`IdleGate` (``AgentClient._request``):

* ``enter`` counts the request in flight and cancels the idle timer; if the VM is stopped it
  is continued (QMP ``cont``, and the host's time sent to the guest, whose clock stood still)
  before the request's first frame leaves, so the request sees a running guest;
* ``leave`` counts it out; the last one out arms the idle timer.

When the timer fires the VM is stopped under the gate's lock, and only if nothing entered
meanwhile. A request that arrives while the ``stop`` is under way counts itself in first, then
waits for the lock, and continues the VM: no request is lost or sees a stopped guest.

A stopped VM keeps its QEMU and its memory; its vCPUs cost no CPU. Work the guest does on
its own (a background process) is frozen with it until the next request: that is why
auto-pause is off unless configured (``warden serve --auto-pause``, ``Machine(auto_pause_s=)``).

The gate also refuses requests (``frozen``) while the VM is being paused to disk, or is paused
(``vmm/pause.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from qemu.qmp import QMPClient

from warden._errors import StateTransitionError

log = logging.getLogger(__name__)

Action = Callable[[], Awaitable[None]]


class IdleGate:
    """Counts a VM's requests in flight; stops the VM after ``idle_s`` without any (None: never)."""

    def __init__(self, name: str, idle_s: float | None = None) -> None:
        self.name = name
        self.idle_s = idle_s if idle_s and idle_s > 0 else None
        self.inflight = 0
        self.stopped = False
        """Stopped by the idle timer (QMP ``stop``); the next request continues it."""
        self.frozen: str | None = None
        """Why requests are refused now (being paused, or paused), or None."""
        self.stops = 0
        self.conts = 0
        self.last_cont_s = 0.0
        """How long the last ``cont`` (with the time sent to the guest) took, in seconds."""
        self._stop: Action | None = None
        self._cont: Action | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Task[None] | None = None

    def configure(self, idle_s: float | None) -> None:
        """Change the idle time (None or 0: never stop)."""
        self.idle_s = idle_s if idle_s and idle_s > 0 else None
        self.arm()

    def bind(self, stop: Action, cont: Action) -> None:
        """What stops and continues the VM (its QMP); arms the timer."""
        self._stop, self._cont = stop, cont
        self.arm()

    def unbind(self) -> None:
        """The VM has no QEMU to stop any more (being paused, stopped, or gone)."""
        self._stop = self._cont = None
        self._disarm()
        if self._stopping is not None and self._stopping is not asyncio.current_task():
            self._stopping.cancel()

    # -- the request path

    async def enter(self) -> None:
        """Count a request in; continue the VM first if the idle timer stopped it."""
        self.inflight += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not (self.stopped or self.frozen is not None or self._lock.locked()):
            return
        try:
            if self.frozen is not None:
                raise StateTransitionError(self.frozen)
            async with self._lock:
                if self.frozen is not None:
                    raise StateTransitionError(self.frozen)
                if self.stopped:
                    await self._wake()
        except BaseException:
            self.leave()
            raise

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.arm()

    # -- the timer

    def arm(self) -> None:
        """Start the idle timer (again), if auto-pause is on and nothing is in flight."""
        self._disarm()
        if self.idle_s is None or self._stop is None or self.stopped or self.inflight:
            return
        if self.frozen is not None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.idle_s, self._fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._stopping = asyncio.create_task(self._idle_stop(), name=f"warden-idle-{self.name}")

    async def _idle_stop(self) -> None:
        async with self._lock:
            stop = self._stop
            if self.inflight or self.stopped or self.frozen is not None or stop is None:
                return
            try:
                await stop()
            except Exception as exc:  # noqa: BLE001 - QEMU gone or QMP closed: nothing to stop
                log.warning("VM %s: the idle stop failed: %s", self.name, exc)
                return
            self.stopped = True
            self.stops += 1
            log.debug("VM %s: stopped after %.3g s idle", self.name, self.idle_s)

    async def _wake(self) -> None:
        """Continue an idle-stopped VM (under the lock)."""
        cont = self._cont
        if cont is None:
            raise StateTransitionError(f"VM {self.name} is stopped and has no QEMU to continue")
        started = time.perf_counter()
        await cont()
        self.stopped = False
        self.conts += 1
        self.last_cont_s = time.perf_counter() - started

    async def wake(self) -> None:
        """Continue the VM now if the idle timer stopped it (before a pause, say)."""
        async with self._lock:
            if self.stopped:
                await self._wake()

    # -- pausing to disk

    @contextlib.asynccontextmanager
    async def exclusive(self, reason: str, what: str = "pause it") -> AsyncIterator[None]:
        """Hold the VM for a pause (or a capture): no request in flight, new ones refused with
        ``reason`` (StateTransitionError). Refuses if requests are in flight (``what`` to do
        once they ended). On an error the gate opens again; on success the caller decides
        (:meth:`reopen`)."""
        async with self._lock:
            if self.frozen is not None:
                raise StateTransitionError(self.frozen)
            if self.inflight:
                raise StateTransitionError(
                    f"VM {self.name} has {self.inflight} request(s) in flight (a command, a "
                    f"file transfer or an open link); {what} once they have ended (`warden "
                    "link rm NAME` closes a link)"
                )
            self._disarm()
            self.frozen = reason
            try:
                yield
            except BaseException:
                self.frozen = None
                raise

    def reopen(self) -> None:
        """Requests may pass again (the VM runs)."""
        self.frozen = None
        self.stopped = False
        self.arm()


async def continue_if_stopped(qmp: QMPClient) -> None:
    """Continue a VM that an earlier manager's idle timer stopped (a new manager reattaches
    with a new session, which the stopped guest could not answer)."""
    status = await qmp.execute("query-status")
    if isinstance(status, dict) and status.get("status") == "paused":
        await qmp.execute("cont")
