"""The daemon's links: made, listed and removed; carried over shared memory, or relayed.

A link joins two running sandboxes, ``a`` and ``b``. :meth:`LinkManager.create` makes a fresh
32-byte key (``secrets.token_bytes``), hands it to each agent in its ``link-open`` request
over that VM's Noise channel (never logged, never on disk: it is dropped once both ends hold
it), and waits until both made their socket; if either refuses, the other is closed again and
nothing is left open. The records are sealed by the guests (:mod:`warden.channel.linkseal`);
the host never sees plaintext. They travel one of two ways (``transport``):

- ``ring`` (the default): a shared-memory region (:mod:`warden.vmm.linkslots`) plugged into a
  link slot of each VM, with a single-producer, single-consumer ring per direction
  (:mod:`warden.wire.ring`, :mod:`warden.guest.ring`). No byte of the stream passes through
  the host: the daemon only sets the link up and takes it down.
- ``relay``: the daemon carries the records between the two agents' channels
  (:mod:`warden.links.relay`), where the ends cannot share memory.

A link ends when both its directions ended (each end answers its ``link-open``), when it is
removed (``link-close`` to both agents, at once), or when either end breaks (its VM stopped,
died or was removed, its agent refused a record): the other end is then closed with the
reason. A ring's region is then zeroed and truncated (no QEMU maps any of it any more) and
unplugged from both VMs. Links are not persisted: they die with the daemon (its agents'
sessions end, which closes every end), and a restarted daemon has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from warden._errors import LinkError, LinkNotFoundError, SpecError, WardenError
from warden.links.relay import relay
from warden.vmm.linkslots import Region
from warden.wire.ops import Key
from warden.wire.ring import ID_SIZE

if TYPE_CHECKING:
    from warden.agent.client import AgentClient
    from warden.agent.link import LinkEnd
    from warden.server.audit import Auditor
    from warden.vmm.linkslots import Slot
    from warden.vmm.machine import Machine

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
CLOSE_TIMEOUT_S = 5.0
"""How long a removal waits for each agent to confirm that its end is closed."""
ROLES = ("a", "b")
Transport = Literal["ring", "relay"]
TRANSPORTS: tuple[Transport, ...] = ("ring", "relay")


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
    """Bytes of records relayed a -> b (ciphertext: each record adds a 16-byte tag); 0 on
    a ring, whose bytes never pass through the daemon."""
    relayed_ba: int = 0
    path: str = "ring"
    """How its bytes travel: ``ring`` (shared memory) or ``relay`` (through the daemon)."""


@dataclass
class _Link:
    info: LinkInfo
    clients: dict[str, AgentClient]
    machines: dict[str, Machine]
    ends: dict[str, LinkEnd] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    region: Region | None = None
    slots: dict[str, Slot] = field(default_factory=dict)


class LinkManager:
    """The daemon's links, by name; owned by the Manager."""

    def __init__(self, machines: _Machines) -> None:
        self._machines = machines
        self._links: dict[str, _Link] = {}
        self._reserved: set[str] = set()
        self._unplugging: set[asyncio.Task[None]] = set()

    def list(self) -> list[LinkInfo]:
        return [link.info for link in sorted(self._links.values(), key=lambda x: x.info.name)]

    def get(self, name: str) -> LinkInfo:
        link = self._links.get(name)
        if link is None:
            raise LinkNotFoundError(f"no link is named {name!r}; `warden link ls` lists them")
        return link.info

    def region(self, name: str) -> Region | None:
        """The shared memory of ring link ``name`` (tests and the benchmark read it)."""
        link = self._links.get(name)
        return link.region if link is not None else None

    async def create(
        self, a: str, b: str, name: str, *, transport: Transport = "ring", plain: bool = False
    ) -> LinkInfo:
        """Link running sandboxes ``a`` and ``b`` (ids or names) as ``name``: audited as
        ``link-create``, refused (nothing left open or plugged) if either is not running,
        they are the same, the name is taken, a VM has no free link slot (ring) or an agent
        refuses its end. ``plain`` (ring only; the benchmark's) leaves the records unsealed."""
        check_link_name(name)
        try:
            info = await self._create(a, b, name, transport, plain)
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
        await self._machines.audit.record(
            "link-create", sandbox=info.a, link=name, peer=info.b, path=info.path
        )
        return info

    async def _create(
        self, a: str, b: str, name: str, transport: Transport, plain: bool
    ) -> LinkInfo:
        if transport not in TRANSPORTS:
            raise SpecError(f"a link's transport is 'ring' or 'relay', not {transport!r}")
        if plain and transport != "ring":
            raise SpecError("only a ring link can be plaintext (the benchmark's)")
        if name in self._links or name in self._reserved:
            raise LinkError(f"a link named {name!r} exists; remove it first or pick another name")
        machine_a = await self._machines.machine(a)
        machine_b = await self._machines.machine(b)
        if machine_a.id == machine_b.id:
            raise LinkError(f"a link joins two different sandboxes, not {machine_a.id} to itself")
        self._reserved.add(name)
        try:
            link = _Link(
                LinkInfo(name, machine_a.id, machine_b.id, time.time(), path=transport),
                {"a": machine_a.agent, "b": machine_b.agent},
                {"a": machine_a, "b": machine_b},
            )
            await self._open(link, plain)
            self._links[name] = link
        finally:
            self._reserved.discard(name)
        log.info("link %s (%s): %s <-> %s", name, transport, machine_a.id, machine_b.id)
        return link.info

    async def _open(self, link: _Link, plain: bool) -> None:
        """Plug the ring's region (ring), open both ends, start the link's task; on any
        failure, take back what was done."""
        options: dict[str, object] = {}
        if link.info.path == "ring":
            link_id = secrets.token_bytes(ID_SIZE)
            options = {Key.TRANSPORT: "ring", Key.LINK_ID: link_id.hex(), Key.PLAIN: plain}
            try:
                await self._plug(link, link_id)
            except BaseException:
                await asyncio.shield(self._teardown(link))
                raise
        await self._open_ends(link, secrets.token_bytes(32), options)
        task = self._watch(link) if link.info.path == "ring" else self._relay(link)
        link.task = asyncio.create_task(task, name=f"warden-link-{link.info.name}")

    async def _plug(self, link: _Link, link_id: bytes) -> None:
        """Make the region and plug it into a free slot of each VM."""
        link.region = Region(link_id)
        for role in ROLES:
            machine = link.machines[role]
            link.slots[role] = await machine.plug_link(link.info.name, link.region)

    async def _open_ends(self, link: _Link, key: bytes, options: dict[str, object]) -> None:
        """Open both ends with ``key``; if one fails, close what was opened and raise."""
        name = link.info.name
        for role in ROLES:
            try:
                link.ends[role] = await link.clients[role].open_link(name, key, role, options)
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
        await self._teardown(link)

    async def _close_ends(self, link: _Link, reason: str) -> None:
        """Ask each open end's agent to close it (both at once), and leave their requests."""

        async def close(role: str) -> None:
            with contextlib.suppress(WardenError, TimeoutError):
                await asyncio.wait_for(
                    link.clients[role].close_link(link.info.name, reason), CLOSE_TIMEOUT_S
                )

        await asyncio.gather(*(close(role) for role in link.ends))

    # -- the link's life

    async def _relay(self, link: _Link) -> None:
        a, b = link.ends["a"], link.ends["b"]
        try:
            await relay(link.info, a, b, lambda reason: self._break(link, reason))
        finally:
            await self._finish(link)

    async def _watch(self, link: _Link) -> None:
        """A ring link: wait until both ends ended (their agents move the bytes)."""

        async def watch(end: LinkEnd) -> None:
            try:
                record = await end.receive()
            except WardenError as exc:
                await self._break(link, f"an end failed: {exc}")
                return
            if record is not None:
                await self._break(link, "an end sent records through the host on a ring link")
            elif (end.ended or {}).get(Key.CLEAN) is not True:
                await self._break(link, end.reason)

        try:
            await asyncio.gather(*(watch(end) for end in link.ends.values()))
        finally:
            await self._finish(link)

    async def _finish(self, link: _Link) -> None:
        for end in link.ends.values():
            await end.close()
        await self._teardown(link)
        if self._links.get(link.info.name) is link:
            del self._links[link.info.name]
        log.info("link %s ended: %s", link.info.name, link.reason or "both directions ended")

    async def _break(self, link: _Link, reason: str) -> None:
        """Close both ends with ``reason`` (once; later callers wait for the first), then
        revoke the ring's region: no guest can reach the other through it any more."""
        if link.reason is not None:
            await link.broken.wait()
            return
        link.reason = reason
        try:
            await self._close_ends(link, reason)
        finally:
            if link.region is not None:
                link.region.revoke()
            link.broken.set()

    async def _teardown(self, link: _Link) -> None:
        """Revoke the region (zeroed, truncated) and unplug it from both VMs, in the
        background: a guest may take seconds to release its device."""
        region, slots = link.region, dict(link.slots)
        link.slots.clear()
        if region is None:
            return
        region.revoke()
        task = asyncio.create_task(self._unplug(link, region, slots))
        self._unplugging.add(task)
        task.add_done_callback(self._unplugging.discard)

    async def _unplug(self, link: _Link, region: Region, slots: dict[str, Slot]) -> None:
        try:
            await asyncio.gather(
                *(link.machines[role].unplug_link(slot) for role, slot in slots.items()),
                return_exceptions=True,
            )
        finally:
            region.close()

    # -- removal

    async def remove(
        self, name: str, reason: str = "the link was removed"
    ) -> tuple[LinkInfo, float]:
        """Close both ends of link ``name`` (audited as ``link-rm``, a missing one too); the
        link, and the seconds it took until both agents confirmed their end closed (and a
        ring's region was revoked)."""
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
        """Close every link (the daemon is stopping), and wait for their devices' unplug."""
        for name in list(self._links):
            with contextlib.suppress(LinkNotFoundError):
                await self.remove(name, "the daemon is stopping")
        if self._unplugging:
            await asyncio.wait(set(self._unplugging), timeout=CLOSE_TIMEOUT_S * 2)
