"""How ``exec`` streams a command's output: binary records (``warden.records``) from a bounded
queue, written as the body of one HTTP response.

Memory is bounded per command, whatever the guest writes and however slowly the client reads:

* the agent client calls :meth:`RecordQueue.put` for each chunk of output and waits while the
  queue holds :data:`QUEUE_LIMIT` bytes; it grants the guest more flow-control credit only once
  the call returned, so a client that does not read stops the guest's output, never piles it up;
* the agent client collects nothing for the daemon (``max_output=0``): the client collects;
* uvicorn waits for the socket to drain before it takes the next piece of the body.

It is also leaner than Starlette's ``StreamingResponse`` on the path every exec takes:

* the status line and headers go out with the first record, not before the command has run;
* records that are already queued go out in one write, and the last write ends the body;
* a client that goes away is noticed by one plain task, which cancels the producer (for exec,
  cancelling kills the command), not by an anyio task group per response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from warden import records
from warden._errors import CommandTimeoutError, WardenError
from warden.agent.client import ExecResult
from warden.server.metrics import Metrics

QUEUE_LIMIT = 1 << 20
"""Bytes of output queued per command before the producer waits (plus at most one record)."""


class RecordQueue:
    """Encoded records between the agent client and the HTTP response, bounded in bytes."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.limit = limit
        self._records: deque[bytes] = deque()
        self._size = 0
        self._ended = False
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    async def put(self, record: bytes) -> None:
        """Queue ``record``, after waiting until the queue holds less than its limit."""
        while self._size >= self.limit:
            self._space.clear()
            await self._space.wait()
        self.put_nowait(record)

    def put_nowait(self, record: bytes) -> None:
        """Queue a (small, control) record without waiting for room."""
        self._records.append(record)
        self._size += len(record)
        self._ready.set()

    def end(self) -> None:
        """Nothing more comes: the body ends after what is queued."""
        self._ended = True
        self._ready.set()

    async def take(self) -> tuple[bytes, bool]:
        """Everything queued, once there is something (or the end); and whether it is the end."""
        while not self._records and not self._ended:
            self._ready.clear()
            await self._ready.wait()
        body = b"".join(self._records)
        self._records.clear()
        self._size = 0
        self._space.set()
        return body, self._ended


class RecordStream(Response):
    media_type = records.MEDIA_TYPE

    def __init__(
        self,
        queue: RecordQueue,
        producer: asyncio.Task[None],
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.producer = producer
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(None)  # no body, so no content-length: the body is chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            started = done = False
            while not done:
                body, done = await self.queue.take()
                if not started:
                    start = {"type": "http.response.start", "status": 200}
                    await send({**start, "headers": self.raw_headers})
                    started = True
                await send({"type": "http.response.body", "body": body, "more_body": not done})
        finally:
            watcher.cancel()
            if not self.producer.done():
                self.producer.cancel()
            for task in (self.producer, watcher):
                with contextlib.suppress(BaseException):
                    await task
            if self.on_close is not None:
                self.on_close()

    async def _watch(self, receive: Receive) -> None:
        """Until the client goes away; then stop the producer and end the body."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.producer.cancel()
        self.queue.end()


ExecCall = Callable[..., Awaitable[ExecResult]]
"""``AgentClient.exec`` (or anything with its signature)."""


async def run_exec(
    exec_fn: ExecCall,
    args: dict[str, Any],
    stdin: bytes | AsyncIterator[bytes] | None,
    metrics: Metrics,
    queue: RecordQueue,
    on_done: Callable[[dict[str, Any], float], Awaitable[None]] | None = None,
) -> None:
    """Run the command with ``args`` (cmd, env, cwd, timeout, user); queue its output as it
    comes, then its final status, then the end of the body. ``on_done(final, seconds)`` (the
    audit record) runs before the final status goes out; if it fails, the client gets its
    error instead of the status."""
    started = time.monotonic()

    async def out(chunk: bytes) -> None:
        metrics.bytes.inc(len(chunk), direction="exec_stdout")
        await queue.put(records.encode(records.Kind.STDOUT, chunk))

    async def err(chunk: bytes) -> None:
        metrics.bytes.inc(len(chunk), direction="exec_stderr")
        await queue.put(records.encode(records.Kind.STDERR, chunk))

    try:
        result = await exec_fn(**args, stdin=stdin, on_stdout=out, on_stderr=err, max_output=0)
        final = _status(result, timed_out=result.timed_out)
        outcome = "timeout" if result.timed_out else "ok"
    except CommandTimeoutError as exc:
        outcome = "timeout"
        final = _status(exc.result, timed_out=True)
    except WardenError as exc:
        final = {"error": str(exc)}
        outcome = "error"
    except asyncio.CancelledError:  # the client went away: the command was killed
        if on_done is not None:
            with contextlib.suppress(WardenError):
                gone = {"error": "cancelled: the client went away, the command was killed"}
                await asyncio.shield(on_done(gone, time.monotonic() - started))
        raise
    elapsed = time.monotonic() - started
    metrics.exec_seconds.observe(elapsed, outcome=outcome)
    if on_done is not None:
        try:
            await on_done(final, elapsed)
        except WardenError as exc:
            final = {"error": f"the command ran, but its audit record failed: {exc}"}
    queue.put_nowait(records.encode_control(final))
    queue.end()


def _status(result: object, *, timed_out: bool) -> dict[str, Any]:
    return {
        "exit_code": getattr(result, "exit_code", None),
        "signal": getattr(result, "signal", None),
        "timed_out": timed_out,
    }
