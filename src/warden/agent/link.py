"""The host's handle on one VM's end of a link: records out of it, records into it.

Made by :meth:`warden.agent.client.AgentClient.open_link`. What the agent sends (sealed
records, DATA on STDOUT) is bounded by the request's flow-control window, granted back only
once :meth:`LinkEnd.consumed` says the record went on; what the host sends the agent (DATA on
STDIN) is bounded by the credit the agent grants with its WINDOW frames
(:mod:`warden.guest.link`). So neither the relay nor the agent ever holds more than a window
of one link's direction.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from warden._errors import AgentError, AgentTimeoutError, WardenError
from warden.wire.frame import Channel, Frame
from warden.wire.ops import Key

if TYPE_CHECKING:
    from warden.agent.client import AgentClient, _Request


class LinkEnd:
    """One VM's end of a link, as the host relays it."""

    def __init__(
        self, client: AgentClient, request: _Request, stack: contextlib.AsyncExitStack
    ) -> None:
        self.client = client
        self._request = request
        self._stack = stack
        self._last: Frame | None = None
        self.ended: dict[str, Any] | None = None
        """The agent's answer once this end ended (``reason``, ``clean``)."""

    async def opened(self, timeout: float) -> None:
        """Wait for the agent's first grant (its socket is made), or its refusal."""
        request = self._request
        granted = asyncio.ensure_future(request.send_granted.wait())
        answered = asyncio.ensure_future(request.next())
        try:
            done, _ = await asyncio.wait(
                {granted, answered}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (granted, answered):
                if not task.done():
                    task.cancel()
        if answered in done:
            answered.result()  # AgentError: the agent refused (bad name, name in use...)
            raise AgentError(f"{self.client.who} closed the link at once")
        if granted not in done:
            raise AgentTimeoutError(f"{self.client.who} did not open the link within {timeout:g}s")

    async def receive(self) -> bytes | None:
        """The next record this end sent; None once it ended (see :attr:`ended`). Raises the
        connection's failure (a WardenError) if the agent is gone."""
        if self.ended is not None:
            return None
        item = await self._request.next()
        if isinstance(item, dict):
            self.ended = item
            return None
        self._last = item
        return item.payload

    def consumed(self) -> None:
        """The last record went on: this end may send as much again."""
        if self._last is not None:
            self._request.consumed(self._last)
            self._last = None

    async def send(self, record: bytes) -> None:
        """Send this end a record of the other end, within the credit its agent granted."""
        request = self._request
        while request.send_credit < len(record):
            request.send_granted.clear()
            if self.ended is not None or request.answered:
                raise AgentError(f"the link's end in {self.client.who} ended")
            await request.send_granted.wait()
        request.send_credit -= len(record)
        await request.send_data(Channel.STDIN, record)

    @property
    def reason(self) -> str:
        ended = self.ended or {}
        return str(ended.get(Key.REASON, "the end is gone"))[:500]

    async def close(self) -> None:
        """Leave the request (cancels it in the agent if it is still open)."""
        if self.ended is None and not self._request.answered:
            with contextlib.suppress(WardenError):
                self._request.cancel()
        with contextlib.suppress(WardenError):
            await self._stack.aclose()
