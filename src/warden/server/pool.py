"""The warm pool: K ready clones per template, handed out by ``create`` in milliseconds.

A pool member is an ordinary VM of the daemon: a clone of its template, launched, warmed up
(its first commands pay TCG's translation; a warmed one answers the next exec as fast as a VM
that has run for a while), recorded in the store with the label ``warden.pool=<template>``
and charged by admission like any other. ``warden ps --all`` shows members; ``warden ps``
does not. A create of that template takes a member (:meth:`WarmPool.take`): the store gives
it the create's name, labels and spec (``hand_over``), and the pool refills in the
background. A refill is a create like any other, so a pool never refills past admission:
refused, it waits and tries again later.

Sizes: ``warden serve --pool NAME=K`` (repeatable; ``K=0`` turns a pool off). By default the
template named ``default`` has a pool of :data:`DEFAULT_SIZE`, once that template exists
(``warden template create default``). A daemon that stops removes its ready members; after
a kill -9, the restarted daemon takes them back (by their label) from the VMs it reattached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from warden._errors import AdmissionError, TemplateError, TemplateNotFoundError, WardenError
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

log = logging.getLogger(__name__)

POOL_LABEL = "warden.pool"
"""The label of a pool member: the template it is a clone of."""
DEFAULT_TEMPLATE = "default"
DEFAULT_SIZE = 2
MAX_SIZE = 512
"""The largest pool (admission still decides how many members it really gets)."""
REFILL_DELAY_S = 1.0
"""How long a refill waits after a member was taken: booting its replacement would take the
CPU from the taken member's first commands (TCG, two cores), which its user is waiting for."""
RETRY_S = 5.0
"""How long a refill waits after admission refused it (or the template was missing)."""
COMMON_COMMANDS = (
    "echo", "cat", "ls", "env", "printf", "head", "tail", "wc", "id", "uname", "pwd", "mkdir",
    "rm", "cp", "mv", "sleep", "date", "test", "sort", "tr", "cut", "touch", "chmod", "ln",
    "stat", "basename", "dirname", "grep", "sed",
)  # fmt: skip
"""Binaries a first command often runs. A member reads them once (~2.5 MB, each member's own
page cache): the first run of a binary nothing has read yet reads it from the squashfs, zstd
decompressed under TCG, ~40 ms of the first ``echo ready`` against ~20 ms once read."""
WARM_UP = (
    ["true"],
    ["sh", "-c", "echo warm"],
    ["sh", "-c", 'cat -- "$@" > /dev/null 2>&1; exit 0', "warm-up"]
    + [f"/usr/bin/{name}" for name in COMMON_COMMANDS],
)
"""The commands every member runs once before it is handed out: the agent's exec path, the
dynamic loader, libc and the shell translated once (TCG translates code on its first run),
and :data:`COMMON_COMMANDS` read into the page cache."""

Launch = Callable[[VMSpec], Awaitable[Machine]]
"""Creates a member through the manager (recorded, admitted, warmed up with ``WARM_UP``;
removed again if that fails) and returns its machine."""


def parse_sizes(pairs: list[str]) -> dict[str, int]:
    """``["py=4", "default=0"]`` -> sizes, with the default pool unless it is named."""
    from warden.vmm.spec import TEMPLATE_RE

    sizes = {DEFAULT_TEMPLATE: DEFAULT_SIZE}
    for pair in pairs:
        name, sep, count = pair.partition("=")
        if not sep or not TEMPLATE_RE.match(name) or not count.isdigit() or int(count) > MAX_SIZE:
            raise ValueError(f"{pair!r} is not NAME=K (a template name and 0 to {MAX_SIZE})")
        sizes[name] = int(count)
    return {name: k for name, k in sizes.items() if k > 0}


@dataclass
class _Pool:
    size: int
    ready: list[Machine] = field(default_factory=list)
    filling: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class WarmPool:
    """The pools of one daemon; :meth:`start` once the manager has reattached its VMs."""

    def __init__(self, sizes: dict[str, int], launch: Launch) -> None:
        self.pools = {name: _Pool(size) for name, size in sizes.items() if size > 0}
        self._launch = launch

    def start(self, held: list[Machine]) -> None:
        """Take back the members among ``held`` (reattached VMs), then start refilling."""
        for machine in held:
            pool = self.pools.get(machine.spec.labels.get(POOL_LABEL, ""))
            if pool is not None and machine.state is VMState.RUNNING:
                pool.ready.append(machine)
        for name, pool in self.pools.items():
            pool.task = asyncio.create_task(self._refill(name, pool), name=f"warden-pool-{name}")

    def serves(self, spec: VMSpec) -> bool:
        """Whether a create of ``spec`` may be served from a pool: a clone of a pooled
        template, with nothing a member would not have (its jail, accelerator, boot)."""
        return (
            spec.template in self.pools
            and spec.accel == "auto"
            and spec.memory_backend == "ram"
            and POOL_LABEL not in spec.labels
        )

    def take(self, template: str) -> Machine | None:
        """A ready member of ``template``'s pool (None: none is ready); the pool refills."""
        pool = self.pools.get(template)
        if pool is None:
            return None
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, pool.wake.set)
        while pool.ready:
            machine = pool.ready.pop(0)
            if machine.state is VMState.RUNNING:
                return machine
        return None

    def put_back(self, template: str, machine: Machine) -> None:
        """A member that could not be handed over (its create was refused) is ready again."""
        pool = self.pools.get(template)
        if pool is not None and machine.state is VMState.RUNNING:
            pool.ready.insert(0, machine)

    def members(self) -> list[Machine]:
        """The ready members of every pool."""
        return [m for pool in self.pools.values() for m in pool.ready]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            name: {"size": p.size, "ready": len(p.ready), "filling": p.filling}
            for name, p in self.pools.items()
        }

    async def close(self) -> None:
        """Stop refilling (a launch under way is cancelled and rolled back); the ready members
        are the manager's to remove (:meth:`members`)."""
        for pool in self.pools.values():
            if pool.task is not None:
                pool.task.cancel()
                with contextlib.suppress(BaseException):
                    await pool.task

    async def _refill(self, name: str, pool: _Pool) -> None:
        while True:
            pool.ready = [m for m in pool.ready if m.state is VMState.RUNNING]
            if len(pool.ready) + pool.filling >= pool.size:
                pool.wake.clear()
                await pool.wake.wait()
                continue
            pool.filling += 1
            try:
                machine = await self._make(name)
            finally:
                pool.filling -= 1
            if machine is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.wake.wait(), RETRY_S)
                continue
            pool.ready.append(machine)

    async def _make(self, name: str) -> Machine | None:
        spec = VMSpec(template=name, labels={POOL_LABEL: name})
        try:
            machine = await self._launch(spec)
        except TemplateNotFoundError:
            log.debug("pool %s: no such template (yet)", name)
            return None
        except (AdmissionError, TemplateError) as exc:
            log.info("pool %s: not refilled now: %s", name, str(exc).splitlines()[0])
            return None
        except WardenError as exc:
            log.warning("pool %s: a member failed: %s", name, str(exc).splitlines()[0])
            return None
        return machine
