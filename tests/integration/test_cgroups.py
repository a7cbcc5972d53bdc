"""The QEMU process of a VM runs in cgroups of its own, with limits, removed at the end."""

from __future__ import annotations

import pytest

from warden import Sandbox
from warden.policy.admission import TCG_VM_OVERHEAD_MIB
from warden.vmm import cgroups
from warden.vmm.machine import Machine

pytestmark = pytest.mark.vm

WHY_NOT = cgroups.available()


@pytest.mark.skipif(WHY_NOT is not None, reason=f"no cgroups here: {WHY_NOT}")
def test_qemu_is_limited_by_its_cgroups(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=256, vcpus=1) as sbx:
        machine = sbx._inner._machine
        assert isinstance(machine, Machine) and machine.cgroup is not None
        group, pid = machine.cgroup, machine.pid
        for controller in cgroups.CONTROLLERS:
            procs = (group.path(controller) / "cgroup.procs").read_text().split()
            assert str(pid) in procs, controller
        limit = int((group.path("memory") / "memory.limit_in_bytes").read_text())
        assert limit == (256 + TCG_VM_OVERHEAD_MIB) << 20
        quota = int((group.path("cpu") / "cpu.cfs_quota_us").read_text())
        assert quota == int(1.5 * cgroups.CPU_PERIOD_US)
        assert sbx.commands.run("echo inside").stdout == "inside\n"
    for controller in cgroups.CONTROLLERS:
        assert not group.path(controller).exists(), f"{controller} cgroup left behind"


def test_limits_follow_the_spec() -> None:
    limits = cgroups.Limits.for_vm(512, 2, 320)
    assert limits.memory_bytes == (512 + 320) << 20
    assert limits.cpu_quota_us == 250_000
