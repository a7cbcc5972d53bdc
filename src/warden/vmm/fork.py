"""Fork: children of a running VM that carry on from its state and share its memory.

``Machine.fork(n)`` saves the running VM as a *transient template* that lives in this
process's memory only (:class:`ForkStore`): its device state without any RAM (~60 KB,
``snapshot.save_device_state``), and a copy of its guest RAM, each in a sealed memfd. Nothing
reaches the disk (no guest memory in a file, nothing to tamper with, no name to collide with
the user's templates; ``warden template list`` never shows it). It then starts ``n`` clones
of it (``vmm/templates.py``, "Cloning"): each maps the copied RAM copy-on-write, so the
children share every page none of them writes, and each carries on from the parent's state,
its files (the guest's writable layer is in its RAM) and processes included. Each child is a
new machine, like any clone: a new id, hostname, channel secret and RNG seed. The parent is
paused for the capture (about 0.2-0.4 s for 256 MiB), then resumes with a new channel secret
(requests in flight then fail).

The transient template is dropped as soon as the children run (their mappings stay); if one
child fails to start, the others are stopped too, and nothing is left.

A clone's own RAM is private (``share=off``: copy-on-write over its template's). Its RAM is
copied as its template's memfd with the pages it wrote on top (``memfd.copy_qemu_ram``), so a
clone (every VM made from the automatic boot template, a fork child too) can be forked and
made a template like a VM booted from an image.
"""

from __future__ import annotations

import asyncio
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
from warden.vmm.templates import LoadedTemplate, TemplateConfig, Templates

if TYPE_CHECKING:
    from warden.vmm.machine import Machine

MAX_CHILDREN = 16
"""The most children one fork makes (each is a VM that admission must still allow)."""


@dataclasses.dataclass
class _Held:
    config: TemplateConfig
    ram: int
    """A sealed memfd: the parent's guest RAM at the fork."""
    state: int
    """A sealed memfd: its device state (a migration stream without RAM)."""
    secret: bytes


class ForkStore(Templates):
    """Transient templates that live in this process's memory only: each is two sealed
    memfds (its RAM, its device state) and the secret its guest holds. Nothing reaches the
    disk, so there is nothing to seal or check against tampering, and no name to collide
    with a template of the user's; ``warden template list`` never sees them."""

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

    def load(self, name: str, *, early: bool = False) -> LoadedTemplate:
        del early  # its RAM is sealed already
        held = self._get(name)
        # A file description of its own (its own offset): children load it concurrently.
        fd = os.open(f"/proc/self/fd/{held.state}", os.O_RDONLY | os.O_CLOEXEC)
        ram = fcntl.fcntl(held.ram, fcntl.F_DUPFD_CLOEXEC, 0)  # the caller's, as the state's
        return LoadedTemplate(name, held.config, ram, io.FileIO(fd, "rb"), held.secret)

    def remove(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
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
        """Like :meth:`Templates.capture`, into sealed memfds instead of files."""
        del extra  # nothing is recorded: the fork lives as long as this call
        if name in self._held:
            raise NameConflictError(f"fork {name!r} exists already")
        state = await _save_state(qmp, name)
        try:
            ram, _ = await asyncio.to_thread(_seal_ram, qemu_pid, config.memory_mib << 20, name)
        except BaseException:
            os.close(state)
            raise
        self._held[name] = _Held(config, ram, state, secret)


async def _save_state(qmp: QMPClient, name: str) -> int:
    """The paused VM's device state, without any of its RAM, in a sealed memfd."""
    fd = os.memfd_create(f"warden-fork-state-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        await save_device_state(qmp, fd, "saving the VM's device state for a fork")
        fcntl.fcntl(fd, memfd.F_ADD_SEALS, memfd.SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal_ram(qemu_pid: int, size: int, name: str) -> tuple[int, str]:
    try:
        # Not hashed: the copy never leaves this process, so there is nothing to verify.
        return memfd.sealed_qemu_ram(qemu_pid, size, f"warden-fork-{name}", hashed=False)
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
    names them (a daemon records each child before it starts); new ids by default."""
    check_forkable(parent, n)
    if vm_ids is not None and len(vm_ids) != n:
        raise SpecError(f"{len(vm_ids)} ids for {n} children")
    store = ForkStore(parent.paths)
    name = f"f{secrets.token_hex(8)}"
    children: list[Machine] = []
    try:
        await parent.save_template(name, keep_running=True, store=store)
        ids: list[str | None] = list(vm_ids) if vm_ids is not None else [None] * n
        children = [_child(parent, store, name, vm_id) for vm_id in ids]
        results = await asyncio.gather(*(c.launch() for c in children), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
    except BaseException:  # a child failed, or the fork was cancelled: none is left running
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
