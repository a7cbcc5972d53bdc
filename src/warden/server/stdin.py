"""Streamed stdin for a command run through the API (``warden exec -i``).

``POST .../exec`` with ``stdin_stream: true`` starts the command with an open stdin and answers
with an ``exec_id`` in the first line of its output stream. The client then sends stdin as the
streamed body of ``PUT .../execs/{exec_id}/stdin``, on a second connection, while it reads the
output on the first. So neither direction waits for the other: a command that writes a lot
before it has read all its input cannot deadlock. The end of that body is the command's EOF.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterable, AsyncIterator

PIPE_DEPTH = 8
"""Chunks held between the HTTP body and the agent: backpressure beyond that."""


class StdinPipe:
    """Carries one command's stdin from a PUT body to the agent, with backpressure."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.id = secrets.token_hex(8)
        self.attached = False
        self.closed = False
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=PIPE_DEPTH)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The command's stdin, as the agent client reads it; ends at the body's end."""
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                return
            yield chunk

    async def feed(self, body: AsyncIterable[bytes]) -> tuple[int, bool]:
        """Forward ``body`` into the command's stdin, then its EOF (also when the body breaks
        off). Returns the bytes forwarded, and whether the command was still there to take
        them all."""
        sent = 0
        try:
            async for chunk in body:
                if self.closed:
                    return sent, False
                if chunk:
                    await self._queue.put(chunk)
                    sent += len(chunk)
        finally:
            if not self.closed:
                await self._queue.put(None)
        return sent, not self.closed

    def close(self) -> None:
        """The command ended: nothing more is read. Wakes a feed blocked on a full pipe."""
        self.closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
