"""Save a clone as a template whose clones share all of its RAM.

A clone's RAM is private copy-on-write memory over its template's (``share=off``), and QEMU
7.2's ``x-ignore-shared`` leaves out only RAM that QEMU maps shared: saved as any VM is, a
clone's device state would carry its whole RAM, which every clone of the new template would
load into memory of its own (213 MiB of PSS each against 61 here). Every default VM is a clone
(of its shape's boot template), so this is the common case.

So a clone is saved in two steps (:func:`save_clone`, with the clone stopped and its agent
session closed): its whole state, RAM included, is migrated into a sealed memfd that never
leaves this process; a *helper* VM of the same shape, whose RAM is a shareable memfd as a
cold-booted VM's is, loads it (``-incoming fd:N``, as a resume does: same guest, same
processes) and its first session re-keys it; the helper is then saved as the template the
usual way (device state without RAM, RAM copied from its memfd, sealed) and ends. The clone
itself is untouched and resumes. This costs a second QEMU for about a second.
"""

from __future__ import annotations

import fcntl
import io
import os
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient

from warden.vmm import memfd
from warden.vmm.snapshot import set_ignore_shared, wait_migration

if TYPE_CHECKING:
    from warden.vmm.machine import Machine
    from warden.vmm.templates import Templates


async def save_clone(
    clone: Machine, store: Templates, name: str, extra: dict[str, Any], held: bytes
) -> None:
    """Save the stopped clone ``clone`` (its guest holds the channel secret ``held``) as
    template ``name`` of ``store``, through a helper VM (see the module's docstring)."""
    assert clone._qmp is not None
    stream = await _save_whole_state(clone._qmp, clone.id)
    helper = type(clone)(
        clone.spec.model_copy(update={"template": None, "boot": "cold", "name": None}),
        paths=clone.paths,
        qemu=clone.qemu,
        wrappers=clone.wrappers,
        use_cgroups=clone.use_cgroups,
        jail=clone.jail_mode,
    )
    helper.restore_from = (io.FileIO(stream, "rb", closefd=True), held)
    try:
        await helper.launch()
        await helper.save_template(name, keep_running=False, extra=extra, store=store)
    finally:
        if helper.restore_from is not None:  # refused before QEMU took it
            helper.restore_from[0].close()
        await helper.shutdown()


async def _save_whole_state(qmp: QMPClient, vm_id: str) -> int:
    """The stopped VM's whole state (RAM included) migrated into a sealed memfd, at offset 0."""
    fd = os.memfd_create(f"warden-rehome-{vm_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        await set_ignore_shared(qmp, False)
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "warden-rehome"})
        await qmp.execute("migrate", {"uri": "fd:warden-rehome"})
        await wait_migration(qmp, "saving the clone's state for its template")
        fcntl.fcntl(fd, memfd.F_ADD_SEALS, memfd.SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
