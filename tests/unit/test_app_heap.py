"""The daemon takes its start-up heap out of the cyclic GC's reach before it starts the
manager (``server/app.py:_freeze_heap``): a full collection walked ~80,000 start-up objects
in the event loop each time (14-28 ms) while every request waited."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, cast

from warden.server.app import _lifespan


class FakeManager:
    """Only what the lifespan calls: the real one starts VMs."""

    def __init__(self) -> None:
        self.frozen_at_start: int | None = None
        self.closed = False

    async def start(self) -> None:
        self.frozen_at_start = gc.get_freeze_count()

    async def close(self) -> None:
        self.closed = True


def test_the_start_up_heap_is_frozen_before_the_manager_starts() -> None:
    gc.unfreeze()
    manager = FakeManager()

    async def main() -> None:
        async with _lifespan(cast(Any, manager), True)(cast(Any, None)):
            assert manager.frozen_at_start is not None and manager.frozen_at_start > 1000
        assert manager.closed

    try:
        assert gc.get_freeze_count() == 0
        asyncio.run(main())
    finally:
        gc.unfreeze()


def test_an_app_that_does_not_manage_its_manager_freezes_nothing() -> None:
    gc.unfreeze()
    manager = FakeManager()

    async def main() -> None:
        async with _lifespan(cast(Any, manager), False)(cast(Any, None)):
            pass

    asyncio.run(main())
    assert gc.get_freeze_count() == 0 and manager.frozen_at_start is None
