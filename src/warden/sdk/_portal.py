"""One event-loop thread per process that runs the async SDK on behalf of the sync SDK.

The thread lives as long as the process: QEMU processes spawned from it carry a parent-death
signal tied to this thread, so it must never exit early.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop  # noqa: PLW0603 - one loop thread per process, made on first use
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="warden-portal", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def call(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on the portal loop and wait for its result (Ctrl-C cancels it)."""
    future = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise
    except concurrent.futures.CancelledError:
        raise KeyboardInterrupt from None


def iterate(agen: AsyncIterator[_T]) -> Iterator[_T]:
    """Drive an async iterator from sync code, one item per call into the loop."""

    async def step() -> tuple[bool, _T | None]:
        try:
            return True, await agen.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        more, item = call(step())
        if not more:
            return
        yield item  # type: ignore[misc]
