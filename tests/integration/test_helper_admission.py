"""Admission charges the helper VM that saving a clone as a template boots (``vmm/rehome.py``):
while it runs, a create that fits only without it is refused, and a save whose helper does not
fit is refused (409) before the clone is touched. Real VMs under TCG, on a Manager of a home
of its own (sharing the images) with a host capacity made to fit a few VMs exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from warden._errors import AdmissionError
from warden.config import Paths
from warden.policy.admission import AdmissionPolicy, HostCapacity
from warden.server.manager import Manager
from warden.vmm.spec import VMSpec

pytestmark = pytest.mark.vm

MEMORY = 256
POLICY = AdmissionPolicy(charge="limits", reserved_host_memory_mib=0, memory_overcommit=1.0)
PER_VM = MEMORY + POLICY.vm_overhead_mib
"""What each VM, and the helper, is charged (``charge="limits"``)."""


def _home(tmp_path: Path) -> Paths:
    """A home of its own (no earlier VMs in its store) that shares the built images."""
    real = Paths.from_env()
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for shared in ("cache", "images"):
        (home / shared).symlink_to(real.home / shared)
    return Paths(home)


@pytest.fixture
async def manager(tmp_path: Path, no_leaks: None) -> AsyncIterator[Manager]:
    """Room for three VMs and half of a fourth."""
    capacity = HostCapacity(memory_mib=3 * PER_VM + PER_VM // 2, cpus=64)
    manager = Manager(_home(tmp_path), policy=POLICY, capacity=capacity)
    await manager.start()
    try:
        yield manager
    finally:
        for row in await asyncio.to_thread(manager.store.list_vms, all=True):
            await manager.remove(row.id, force=True)
        await manager.close()


async def _clone(manager: Manager) -> str:
    """A running clone of template ``base`` (saved from a cold VM, which needs no helper)."""
    source = await manager.create(VMSpec(memory_mib=MEMORY, boot="cold"))
    await manager.save_template(source.id, "base")
    await manager.remove(source.id, force=True)
    clone = await manager.create(VMSpec(template="base"))
    assert (await manager.machine(clone.id)).booted_from == "template"
    return clone.id


async def test_the_helper_vm_is_charged_while_it_runs(manager: Manager) -> None:
    clone = await _clone(manager)
    await manager.create(VMSpec(memory_mib=MEMORY, boot="cold"))  # two VMs: the third fits
    save = asyncio.create_task(manager.save_template(clone, "saved"))
    while not manager.helpers and not save.done():
        await asyncio.sleep(0.005)
    assert manager.helpers, "the save ended without a helper VM being charged"
    with pytest.raises(AdmissionError):  # two VMs and the helper: no room for a third
        await manager.create(VMSpec(memory_mib=MEMORY, boot="cold"))
    await save
    assert manager.helpers == {}
    assert manager.templates.exists("saved")
    await manager.create(VMSpec(memory_mib=MEMORY, boot="cold"))  # the helper is gone


async def test_a_save_whose_helper_does_not_fit_is_refused(manager: Manager) -> None:
    clone = await _clone(manager)
    for _ in range(2):  # three VMs: no room for the helper
        await manager.create(VMSpec(memory_mib=MEMORY, boot="cold"))
    with pytest.raises(AdmissionError, match="helper VM"):
        await manager.save_template(clone, "saved")
    assert not manager.templates.exists("saved")
    assert manager.helpers == {}
    machine = await manager.machine(clone)  # untouched: still running, same session
    assert (await machine.agent.exec(["true"])).exit_code == 0
