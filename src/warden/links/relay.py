"""The relayed path of links: the daemon carries sealed records between two agents.

Used where the two ends cannot share memory (``transport="relay"``; later, ends on two
hosts). A record read from one end's request (bounded by its flow-control window, granted
back only once the record went on) is sent to the other end within the credit that end's
agent granted. The daemon holds at most one window (1 MiB) per direction and never sees
plaintext: the records are sealed by the guests (:mod:`warden.channel.linkseal`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from warden._errors import WardenError
from warden.wire.ops import Key

if TYPE_CHECKING:
    from warden.agent.link import LinkEnd
    from warden.links.manager import LinkInfo

Break = Callable[[str], Awaitable[None]]
"""Closes both ends of the link with a reason (once)."""


async def relay(info: LinkInfo, a: LinkEnd, b: LinkEnd, on_break: Break) -> None:
    """Relay both directions until both ended (or the link broke)."""
    await asyncio.gather(_pump(info, a, b, "ab", on_break), _pump(info, b, a, "ba", on_break))


async def _pump(
    info: LinkInfo, src: LinkEnd, dst: LinkEnd, direction: str, on_break: Break
) -> None:
    """Relay src's records to dst until src ends; break the link on any failure."""
    try:
        while (record := await src.receive()) is not None:
            await dst.send(record)
            if direction == "ab":
                info.relayed_ab += len(record)
            else:
                info.relayed_ba += len(record)
            src.consumed()
    except WardenError as exc:
        await on_break(f"an end failed: {exc}")
        return
    ended = src.ended or {}
    if ended.get(Key.CLEAN) is not True:
        await on_break(src.reason)
