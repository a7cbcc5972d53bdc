"""The relayed path of links: the daemon carries sealed records between two agents.

A link joins two running sandboxes, ``a`` and ``b``. :meth:`LinkManager.create` makes a fresh
32-byte key (``secrets.token_bytes``), hands it to each agent in its ``link-open`` request
over that VM's Noise channel (never logged, never on disk: it is dropped once both ends hold
it), and waits until both made their socket; if either refuses, the other is closed again and
nothing is left open. Then two tasks relay records, one per direction: a record read from one
end's request (bounded by its flow-control window, granted back only once the record went on)
is sent to the other end within the credit that end's agent granted. The daemon holds at most
one window (1 MiB) per direction and never sees plaintext: the records are sealed by the
guests (:mod:`warden.channel.linkseal`).

A link ends when both its directions ended (each end answers its ``link-open``), when it is
removed (``link-close`` to both agents, at once), or when either end breaks (its VM stopped,
died or was removed, its agent refused a record): the other end is then closed with the
reason. Links are not persisted: they die with the daemon (its agents' sessions end, which
closes every end), and a restarted daemon has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from warden._errors import LinkError, LinkNotFoundError, SpecError, WardenError
from warden.wire.ops import Key

if TYPE_CHECKING:
    from warden.agent.client import AgentClient
    from warden.agent.link import LinkEnd
    from warden.server.audit import Auditor
    from warden.vmm.machine import Machine

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
CLOSE_TIMEOUT_S = 5.0
"""How long a removal waits for each agent to confirm that its end is closed."""
ROLES = ("a", "b")


def check_link_name(name: str) -> str:
    """``name`` if it is a valid link name; SpecError otherwise."""
    if not NAME_RE.fullmatch(name):
        raise SpecError(
            f"bad link name {name!r}: use 1 to 63 of a-z, 0-9, '_', '.', '-', starting with a "
            "letter or digit"
        )
    return name


class _Machines(Protocol):
    audit: Auditor

    async def machine(self, id_or_name: str) -> Machine: ...


@dataclass
class LinkInfo:
    """A link as ``link ls`` shows it."""

    name: str
    a: str
    """The id of the sandbox at end ``a``."""
    b: str
    created: float
    relayed_ab: int = 0
    """Bytes of records relayed a -> b (ciphertext: each record adds a 16-byte tag)."""
    relayed_ba: int = 0
    path: str = "relay"
    """How its bytes travel: ``relay`` (through the daemon)."""


@dataclass
class _Link:
    info: LinkInfo
    clients: dict[str, AgentClient]
    ends: dict[str, LinkEnd] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None


class LinkManager:
    """The daemon's links, by name; owned by the Manager."""

    def __init__(self, machines: _Machines) -> None:
        self._machines = machines
        self._links: dict[str, _Link] = {}
        self._reserved: set[str] = set()

    def list(self) -> list[LinkInfo]:
        return [link.info for link in sorted(self._links.values(), key=lambda x: x.info.name)]

    def get(self, name: str) -> LinkInfo:
        link = self._links.get(name)
        if link is None:
            raise LinkNotFoundError(f"no link is named {name!r}; `warden link ls` lists them")
        return link.info

    async def create(self, a: str, b: str, name: str) -> LinkInfo:
        """Link running sandboxes ``a`` and ``b`` (ids or names) as ``name``: audited as
        ``link-create``, refused (nothing left open) if either is not running, they are the
        same, the name is taken, or an agent refuses its end."""
        check_link_name(name)
        try:
            info = await self._create(a, b, name)
        except (WardenError, asyncio.CancelledError) as exc:
            await asyncio.shield(
                self._machines.audit.record(
                    "link-create",
                    sandbox=a,
                    outcome="error",
                    error=type(exc).__name__,
                    link=name,
                    peer=b,
                )
            )
            raise
        await self._machines.audit.record("link-create", sandbox=info.a, link=name, peer=info.b)
        return info

    async def _create(self, a: str, b: str, name: str) -> LinkInfo:
        if name in self._links or name in self._reserved:
            raise LinkError(f"a link named {name!r} exists; remove it first or pick another name")
        machine_a = await self._machines.machine(a)
        machine_b = await self._machines.machine(b)
        if machine_a.id == machine_b.id:
            raise LinkError(f"a link joins two different sandboxes, not {machine_a.id} to itself")
        self._reserved.add(name)
        try:
            link = _Link(
                LinkInfo(name, machine_a.id, machine_b.id, time.time()),
                {"a": machine_a.agent, "b": machine_b.agent},
            )
            await self._open_ends(link, secrets.token_bytes(32))
            link.task = asyncio.create_task(self._relay(link), name=f"warden-link-{name}")
            self._links[name] = link
        finally:
            self._reserved.discard(name)
        log.info("link %s: %s <-> %s", name, machine_a.id, machine_b.id)
        return link.info

    async def _open_ends(self, link: _Link, key: bytes) -> None:
        """Open both ends with ``key``; if one fails, close what was opened and raise."""
        name = link.info.name
        for role in ROLES:
            try:
                link.ends[role] = await link.clients[role].open_link(name, key, role)
            except asyncio.CancelledError:  # the caller went away: leave nothing open
                await asyncio.shield(self._abandon(link))
                raise
            except WardenError as exc:
                await self._abandon(link)
                vm = link.info.a if role == "a" else link.info.b
                raise LinkError(
                    f"sandbox {vm} could not open its end of link {name!r}: {exc}"
                ) from exc

    async def _abandon(self, link: _Link) -> None:
        """Close the ends opened so far of a link that could not be made."""
        await self._close_ends(link, "the other end could not be opened")
        for end in link.ends.values():
            await end.close()

    async def _close_ends(self, link: _Link, reason: str) -> None:
        """Ask each open end's agent to close it (both at once), and leave their requests."""

        async def close(role: str) -> None:
            with contextlib.suppress(WardenError, TimeoutError):
                await asyncio.wait_for(
                    link.clients[role].close_link(link.info.name, reason), CLOSE_TIMEOUT_S
                )

        await asyncio.gather(*(close(role) for role in link.ends))

    # -- relaying

    async def _relay(self, link: _Link) -> None:
        a, b = link.ends["a"], link.ends["b"]
        try:
            await asyncio.gather(self._pump(link, a, b, "ab"), self._pump(link, b, a, "ba"))
        finally:
            for end in (a, b):
                await end.close()
            if self._links.get(link.info.name) is link:
                del self._links[link.info.name]
            log.info("link %s ended: %s", link.info.name, link.reason or "both directions ended")

    async def _pump(self, link: _Link, src: LinkEnd, dst: LinkEnd, direction: str) -> None:
        """Relay src's records to dst until src ends; break the link on any failure."""
        try:
            while (record := await src.receive()) is not None:
                await dst.send(record)
                if direction == "ab":
                    link.info.relayed_ab += len(record)
                else:
                    link.info.relayed_ba += len(record)
                src.consumed()
        except WardenError as exc:
            await self._break(link, f"an end failed: {exc}")
            return
        ended = src.ended or {}
        if ended.get(Key.CLEAN) is not True:
            await self._break(link, src.reason)

    async def _break(self, link: _Link, reason: str) -> None:
        """Close both ends with ``reason`` (once; later callers wait for the first)."""
        if link.reason is not None:
            await link.broken.wait()
            return
        link.reason = reason
        try:
            await self._close_ends(link, reason)
        finally:
            link.broken.set()

    # -- removal

    async def remove(
        self, name: str, reason: str = "the link was removed"
    ) -> tuple[LinkInfo, float]:
        """Close both ends of link ``name`` (audited as ``link-rm``, a missing one too); the
        link, and the seconds it took until both agents confirmed their socket closed."""
        link = self._links.get(name)
        if link is None:
            await self._machines.audit.record(
                "link-rm", outcome="error", error="LinkNotFoundError", link=name
            )
            self.get(name)  # raises LinkNotFoundError
            raise AssertionError("unreachable")
        start = time.perf_counter()
        await self._break(link, reason)
        took = time.perf_counter() - start
        if link.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, WardenError):
                await asyncio.wait_for(asyncio.shield(link.task), CLOSE_TIMEOUT_S)
        await self._machines.audit.record(
            "link-rm", sandbox=link.info.a, link=name, peer=link.info.b, ms=round(took * 1000, 1)
        )
        return link.info, took

    async def close(self) -> None:
        """Close every link (the daemon is stopping)."""
        for name in list(self._links):
            with contextlib.suppress(LinkNotFoundError):
                await self.remove(name, "the daemon is stopping")
