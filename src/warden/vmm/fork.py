"""Fork: children of a running VM that carry on from its state and share its memory.

``Machine.fork(n)`` saves the running VM as a *transient template* (``vmm/templates.py``:
its device state, a sparse copy of its RAM, sealed) in a store of its own,
:class:`ForkStore` (``run/forks/<name>/``, channel secret ``keys/fork/<name>``), which
``warden template list`` never shows and whose names no user can take. It then starts ``n``
clones of it: each maps the copied RAM from a sealed memfd copy-on-write, so the children share
every page none of them writes, and each carries on from the parent's state, its files (the
guest's writable layer is in its RAM) and processes included. Each child is a new machine,
like any clone: a new id, hostname, channel secret and RNG seed. The parent is paused for the
capture, then resumes with a new channel secret (requests in flight then fail).

The transient template is removed as soon as the children run (their mappings stay); if one
child fails to start, the others are stopped too, and nothing is left.

**Limitation.** A clone's own RAM is private (``share=off``: copy-on-write over its template's),
so the host cannot copy it: a clone, a fork child included, cannot be forked nor made a
template. Only a VM booted from an image (cold, or from its boot snapshot) can.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import TYPE_CHECKING, Any

from warden._errors import SpecError, TemplateError
from warden.config import Paths
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.templates import Templates

if TYPE_CHECKING:
    from warden.vmm.machine import Machine

MAX_CHILDREN = 16
"""The most children one fork makes (each is a VM that admission must still allow)."""

KEY_NAMESPACE = "fork"


class _ForkKeys(ChannelKeys):
    """The channel secrets of transient fork templates: ``keys/fork/<name>``."""

    def save_template(self, name: str, secret: bytes) -> None:
        self.store.put(f"{KEY_NAMESPACE}/{name}", secret)

    def template(self, name: str) -> bytes | None:
        return self.store.get(f"{KEY_NAMESPACE}/{name}")

    def forget_template(self, name: str) -> None:
        self.store.delete(f"{KEY_NAMESPACE}/{name}")


class ForkStore(Templates):
    """The store of transient fork templates: ``run/forks/``, outside the template store."""

    def __init__(self, paths: Paths) -> None:
        super().__init__(paths)
        self.root = paths.run / "forks"
        self.keys = _ForkKeys(paths)


def check_forkable(parent: Machine, n: int) -> None:
    """Refuse a fork that cannot work before the parent is paused (SpecError, TemplateError)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHILDREN:
        raise SpecError(f"n={n!r}: a fork makes 1 to {MAX_CHILDREN} children")
    if parent.booted_from == "template":
        raise TemplateError(
            f"VM {parent.id} is a clone (of a template, or a fork child): its RAM is private "
            "copy-on-write memory that cannot be copied, so it cannot be forked nor made a "
            "template; fork the VM it came from, or a VM booted from an image"
        )


async def fork(parent: Machine, n: int, *, extra: dict[str, Any] | None = None) -> list[Machine]:
    """Start ``n`` children of the running VM ``parent`` (see the module's docstring); they
    are running when this returns, and the caller owns them (shut each down)."""
    check_forkable(parent, n)
    store = ForkStore(parent.paths)
    name = f"f{secrets.token_hex(8)}"
    record = {"source": parent.id, "fork": True, **(extra or {})}
    await parent.save_template(name, keep_running=True, extra=record, store=store)
    try:
        children = [_child(parent, store, name) for _ in range(n)]
        results = await asyncio.gather(*(c.launch() for c in children), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(c.shutdown() for c in children), return_exceptions=True)
            raise failed[0]
    finally:
        with contextlib.suppress(TemplateError):
            store.remove(name)
    for child in children:
        child.forked_from = parent.id
    return children


def _child(parent: Machine, store: ForkStore, name: str) -> Machine:
    child = type(parent)(
        parent.spec.model_copy(update={"template": name, "name": None}),
        paths=parent.paths,
        ownership=parent.ownership,
        qemu=parent.qemu,
        wrappers=parent.wrappers,
        use_cgroups=parent.use_cgroups,
        jail=parent.jail_mode,
    )
    child.templates = store
    return child
