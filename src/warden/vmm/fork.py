"""Fork: children of a running VM that carry on from its state and share its memory.

``Machine.fork(n)`` saves the running VM as a *transient template* that lives in this
process's memory only (:class:`ForkStore`): its device state without any RAM (~60 KB,
``snapshot.save_device_state``), and a copy of its guest RAM, each in a sealed memfd. Nothing
reaches the disk (no guest memory in a file, nothing to tamper with, no name to collide with
the user's templates; ``warden template list`` never shows it). Its ``n`` children are clones
of it (``vmm/templates.py``, "Cloning"): each maps the copied RAM copy-on-write, so the
children share every page none of them writes, and each carries on from the parent's state,
its files (the guest's writable layer is in its RAM) and processes included. Each child is a
new machine, like any clone: a new id, hostname, channel secret and RNG seed. The parent is
stopped for the capture (0.06-0.2 s for 256 MiB), then resumes with a new channel secret; a
fork is refused while the parent has requests in flight.

The children's QEMUs start as the capture begins, on the transient template's memfds while
they are still empty; each loads the state once the capture has sealed both
(:attr:`LoadedTemplate.ram_ready`, as for the first clone of a template on disk), while the
parent re-keys.

The transient template is dropped as soon as the children run (their mappings stay); if one
child fails to start, the others are stopped too, and nothing is left.

A clone's own RAM is private (``share=off``: copy-on-write over its template's). Its RAM is
copied as its template's memfd with the pages it wrote on top (``memfd.copy_qemu_ram``), so a
clone (every VM made from the automatic boot template, a fork child too) can be forked and
made a template like a VM booted from an image.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fcntl
import io
import os
import secrets
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient

from warden._errors import NameConflictError, SpecError, TemplateError, TemplateNotFoundError
from warden.config import Paths
from warden.vmm import memfd
from warden.vmm.snapshot import save_device_state
from warden.vmm.templates import CaptureHold, LoadedTemplate, TemplateConfig, Templates

if TYPE_CHECKING:
    from warden.vmm.machine import Machine

MAX_CHILDREN = 16
"""The most children one fork makes (each is a VM that admission must still allow)."""


@dataclasses.dataclass
class _Held:
    config: TemplateConfig
    ram: int
    """A memfd, sealed once filled: the parent's guest RAM at the fork."""
    state: int
    """A memfd, sealed once filled: its device state (a migration stream without RAM)."""
    secret: bytes
    ready: concurrent.futures.Future[None]
    """Resolved once both are filled and sealed (or failed: the capture did not happen)."""


class ForkStore(Templates):
    """Transient templates that live in this process's memory only: each is two sealed
    memfds (its RAM, its device state) and the secret its guest holds. Nothing reaches the
    disk, so there is nothing to seal or check against tampering, and no name to collide
    with a template of the user's; ``warden template list`` never sees them.

    A fork's is made empty first (:meth:`prepare`), so that its children's QEMUs start while
    the parent is captured into it; each child loads the state only once the capture sealed
    it (:attr:`LoadedTemplate.ram_ready`)."""

    def __init__(self, paths: Paths) -> None:
        super().__init__(paths)
        self._held: dict[str, _Held] = {}

    def exists(self, name: str) -> bool:
        return name in self._held

    def names(self, *, automatic: bool = False) -> list[str]:
        return sorted(self._held)

    def sealed_config(self, name: str) -> TemplateConfig:
        return self._get(name).config

    def _get(self, name: str) -> _Held:
        held = self._held.get(name)
        if held is None:
            raise TemplateNotFoundError(f"fork {name!r} is gone (its children have started)")
        return held

    def prepare(self, name: str, hold: CaptureHold) -> None:
        """Make ``name`` empty, for :meth:`capture` to fill: children may load it meanwhile."""
        if name in self._held:
            raise NameConflictError(f"fork {name!r} exists already")
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        ram = os.memfd_create(f"warden-fork-{name}", flags)
        try:
            os.ftruncate(ram, hold.config.memory_mib << 20)
            state = os.memfd_create(f"warden-fork-state-{name}", flags)
        except BaseException:
            os.close(ram)
            raise
        self._held[name] = _Held(hold.config, ram, state, hold.secret, concurrent.futures.Future())

    def fail(self, name: str, why: BaseException) -> None:
        """The capture of a prepared ``name`` did not happen: its children's loads fail."""
        held = self._held.get(name)
        if held is not None and not held.ready.done():
            held.ready.set_exception(
                TemplateError(f"the parent VM could not be captured for the fork: {why!r}")
            )

    def load(self, name: str, *, early: bool = False) -> LoadedTemplate:
        del early  # a prepared one resolves once captured
        held = self._get(name)
        # A file description of its own (its own offset): children load it concurrently.
        fd = os.open(f"/proc/self/fd/{held.state}", os.O_RDONLY | os.O_CLOEXEC)
        ram = fcntl.fcntl(held.ram, fcntl.F_DUPFD_CLOEXEC, 0)  # the caller's, as the state's
        state = io.FileIO(fd, "rb")
        return LoadedTemplate(name, held.config, ram, state, held.secret, held.ready)

    def remove(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            self.fail(name, asyncio.CancelledError())  # removed before it was captured
            os.close(held.ram)
            os.close(held.state)

    async def capture(
        self,
        qmp: QMPClient,
        qemu_pid: int,
        name: str,
        config: TemplateConfig,
        secret: bytes,
        extra: dict[str, Any],
    ) -> None:
        """Like :meth:`Templates.capture`, into the sealed memfds of ``name`` (made by
        :meth:`prepare`, or now)."""
        del extra  # nothing is recorded: the fork lives as long as this call
        if name not in self._held:
            self.prepare(name, CaptureHold(config, secret))
        held = self._held[name]
        if held.ready.done():
            raise NameConflictError(f"fork {name!r} was captured already")
        try:
            await save_device_state(qmp, held.state, "saving the VM's device state for a fork")
            fcntl.fcntl(held.state, memfd.F_ADD_SEALS, memfd.SEALS)
            await asyncio.to_thread(_fill_ram, qemu_pid, held)
        except BaseException as exc:
            self.fail(name, exc)
            raise
        held.ready.set_result(None)


def _fill_ram(qemu_pid: int, held: _Held) -> None:
    size = held.config.memory_mib << 20
    try:
        # Not hashed: the copy never leaves this process, so there is nothing to verify.
        memfd.copy_qemu_ram(qemu_pid, size, held.ram, hashed=False)
        fcntl.fcntl(held.ram, memfd.F_ADD_SEALS, memfd.SEALS)
    except OSError as exc:
        raise TemplateError(
            f"the VM's guest RAM cannot be copied ({exc.strerror or exc}): only a VM whose "
            "RAM is a memfd (memory_backend 'ram', the default) can be forked"
        ) from None


def check_forkable(parent: Machine, n: int) -> None:
    """Refuse a fork that cannot work before the parent is paused (SpecError, TemplateError)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHILDREN:
        raise SpecError(f"n={n!r}: a fork makes 1 to {MAX_CHILDREN} children")
    if parent.spec.memory_backend == "file":
        raise TemplateError(
            f"VM {parent.id} keeps its RAM in a file (memory_backend='file'): only a VM with "
            "the default RAM (a memfd) can be forked"
        )


async def fork(parent: Machine, n: int, vm_ids: list[str] | None = None) -> list[Machine]:
    """Start ``n`` children of the running VM ``parent`` (see the module's docstring); they
    are running when this returns, and the caller owns them (shut each down). ``vm_ids``
    names them (a daemon records each child before it starts); new ids by default.

    The children's QEMUs start while the parent is captured, and the parent's re-key runs
    while they load its state: neither waits for the other."""
    check_forkable(parent, n)
    if vm_ids is not None and len(vm_ids) != n:
        raise SpecError(f"{len(vm_ids)} ids for {n} children")
    store = ForkStore(parent.paths)
    name = f"f{secrets.token_hex(8)}"
    ids: list[str | None] = list(vm_ids) if vm_ids is not None else [None] * n
    children: list[Machine] = []
    launches: list[asyncio.Task[None]] = []
    try:
        async with parent.held_for_capture(name, store) as hold:
            store.prepare(name, hold)
            children = [_child(parent, store, name, vm_id) for vm_id in ids]
            launches = [asyncio.create_task(c.launch(), name=f"fork-{c.id}") for c in children]
            await parent.capture(store, name, hold, {}, keep_running=True)
        parent.idle.reopen()
        results = await asyncio.gather(*launches, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
    except BaseException as exc:  # a child failed, or the fork was cancelled: none is left running
        store.fail(name, exc)
        for launch in launches:
            launch.cancel()
        await asyncio.gather(*launches, return_exceptions=True)
        await asyncio.gather(*(c.shutdown() for c in children), return_exceptions=True)
        raise
    finally:
        store.remove(name)
    for child in children:
        child.forked_from = parent.id
        # The transient template is gone: the child names none, and saves to the real store.
        child.spec = child.spec.model_copy(update={"template": None})
        child.templates = parent.templates
    return children


def _child(parent: Machine, store: ForkStore, name: str, vm_id: str | None) -> Machine:
    child = type(parent)(
        parent.spec.model_copy(update={"template": name, "name": None}),
        paths=parent.paths,
        ownership=parent.ownership,
        qemu=parent.qemu,
        wrappers=parent.wrappers,
        use_cgroups=parent.use_cgroups,
        jail=parent.jail_mode,
        vm_id=vm_id,
    )
    child.templates = store
    return child
