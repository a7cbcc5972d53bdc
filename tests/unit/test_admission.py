"""Admission control: limits at their boundaries, ratios, per-VM overhead, and the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from warden._errors import AdmissionError, HostError, SpecError, WardenError
from warden.policy import (
    QEMU_BASE_OVERHEAD_MIB,
    TCG_VM_OVERHEAD_MIB,
    AdmissionPolicy,
    HostCapacity,
    check,
)
from warden.store import Reservations, Store
from warden.vmm.argv import TCG_TB_SIZE_MIB
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

# 4096 MiB host - 96 kept = 4000 MiB for VMs at ratio 1.0; 2 CPUs x 4 = 8 vcpus.
CAP = HostCapacity(memory_mib=4096, cpus=2)
POLICY = AdmissionPolicy(reserved_host_memory_mib=96, vm_overhead_mib=100)


def admit(
    policy: AdmissionPolicy = POLICY,
    capacity: HostCapacity = CAP,
    *,
    memory: int = 0,
    vcpus: int = 0,
    vms: int = 0,
    req_memory: int = 64,
    req_vcpus: int = 1,
) -> None:
    check(
        policy,
        capacity,
        reserved_memory_mib=memory,
        reserved_vcpus=vcpus,
        reserved_vms=vms,
        request_memory_mib=req_memory,
        request_vcpus=req_vcpus,
    )


def test_memory_exactly_at_the_limit_is_admitted_one_mib_over_is_not() -> None:
    # Reserved: 2 VMs of 500 MiB + 2 x 100 overhead = 1200; request 2700 + 100 = 2800 -> 4000.
    admit(memory=1000, vms=2, vcpus=2, req_memory=2700)
    with pytest.raises(AdmissionError, match="memory"):
        admit(memory=1000, vms=2, vcpus=2, req_memory=2701)


def test_vcpus_exactly_at_the_limit_is_admitted_one_over_is_not() -> None:
    admit(vcpus=6, vms=1, memory=64, req_vcpus=2)
    with pytest.raises(AdmissionError, match="vcpus"):
        admit(vcpus=6, vms=1, memory=64, req_vcpus=3)
    with pytest.raises(AdmissionError, match="vcpus"):
        admit(vcpus=8, vms=1, memory=64, req_vcpus=1)


def test_first_vm_alone_against_the_limits() -> None:
    admit(req_memory=3900, req_vcpus=8)
    with pytest.raises(AdmissionError):
        admit(req_memory=3901)
    with pytest.raises(AdmissionError):
        admit(req_vcpus=9)


def test_overhead_is_charged_for_every_active_vm() -> None:
    # Same guest memory, one more VM holding it: 100 MiB more overhead tips it over.
    admit(memory=1000, vms=2, req_memory=2700)
    with pytest.raises(AdmissionError, match=r"3 active VMs hold 1300 MiB"):
        admit(memory=1000, vms=3, req_memory=2700)
    no_overhead = AdmissionPolicy(reserved_host_memory_mib=96, vm_overhead_mib=0)
    admit(no_overhead, memory=1000, vms=30, req_memory=3000)


def test_memory_overcommit_ratio() -> None:
    over = AdmissionPolicy(memory_overcommit=1.5, reserved_host_memory_mib=96, vm_overhead_mib=100)
    assert over.memory_limit_mib(CAP) == 6000
    admit(over, memory=5800, vms=1, req_memory=0)  # 5900 + 100
    with pytest.raises(AdmissionError, match=r"memory_overcommit 1\.5"):
        admit(over, memory=5800, vms=1, req_memory=1)
    under = AdmissionPolicy(memory_overcommit=0.5, reserved_host_memory_mib=96, vm_overhead_mib=0)
    assert under.memory_limit_mib(CAP) == 2000
    with pytest.raises(AdmissionError):
        admit(under, req_memory=2001)


def test_vcpu_overcommit_ratio_rounds_down() -> None:
    one = AdmissionPolicy(vcpu_overcommit=1.0, vm_overhead_mib=0)
    admit(one, vcpus=1, req_vcpus=1)
    with pytest.raises(AdmissionError, match=r"vcpu_overcommit 1\b"):
        admit(one, vcpus=2, req_vcpus=1)
    frac = AdmissionPolicy(vcpu_overcommit=1.5)
    three = HostCapacity(memory_mib=4096, cpus=3)
    assert frac.vcpu_limit(three) == 4  # 4.5 -> 4
    admit(frac, three, vcpus=3, req_vcpus=1)
    with pytest.raises(AdmissionError):
        admit(frac, three, vcpus=4, req_vcpus=1)


def test_memory_message_names_limit_numbers_and_option() -> None:
    with pytest.raises(AdmissionError) as info:
        admit(memory=1000, vms=2, req_memory=2701)
    msg = str(info.value)
    assert isinstance(info.value, WardenError)
    for part in (
        "memory:",
        "needs 2801 MiB (2701 MiB guest + 100 MiB QEMU overhead)",
        "2 active VMs hold 1200 MiB",
        "the limit is 4000 MiB",
        "4096 MiB host",
        "reserved_host_memory_mib 96",
        "memory_overcommit 1",
        "raise memory_overcommit",
    ):
        assert part in msg, (part, msg)
    assert "vcpu" not in msg


def test_vcpu_message_names_limit_numbers_and_option() -> None:
    with pytest.raises(AdmissionError) as info:
        admit(vcpus=7, vms=3, memory=192, req_vcpus=2)
    msg = str(info.value)
    for part in (
        "vcpus:",
        "needs 2",
        "3 active VMs hold 7",
        "the limit is 8 (2 host CPUs x vcpu_overcommit 4)",
        "raise vcpu_overcommit",
    ):
        assert part in msg, (part, msg)
    assert "memory_overcommit" not in msg


def test_both_limits_are_named_when_both_are_passed() -> None:
    with pytest.raises(AdmissionError) as info:
        admit(req_memory=5000, req_vcpus=9)
    msg = str(info.value)
    assert "raise memory_overcommit" in msg and "raise vcpu_overcommit" in msg


def test_defaults() -> None:
    p = AdmissionPolicy()
    assert (p.memory_overcommit, p.vcpu_overcommit, p.reserved_host_memory_mib) == (1.0, 4.0, 512)
    assert p.vm_overhead_mib == TCG_VM_OVERHEAD_MIB == QEMU_BASE_OVERHEAD_MIB + TCG_TB_SIZE_MIB
    assert p.memory_limit_mib(HostCapacity(memory_mib=512, cpus=1)) == 0
    with pytest.raises(AdmissionError):
        admit(p, HostCapacity(memory_mib=512, cpus=1), req_memory=64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_overcommit": 0.0},
        {"memory_overcommit": -1.0},
        {"vcpu_overcommit": float("nan")},
        {"vcpu_overcommit": float("inf")},
        {"reserved_host_memory_mib": -1},
        {"vm_overhead_mib": -1},
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(SpecError, match=next(iter(kwargs))):
        AdmissionPolicy(**kwargs)  # type: ignore[arg-type]


def test_capacity_from_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  100 kB\nMemTotal:       24684084 kB\nSwapTotal: 0 kB\n")
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert HostCapacity.from_host(meminfo) == HostCapacity(memory_mib=24105, cpus=6)
    meminfo.write_text("MemFree: 100 kB\n")
    with pytest.raises(HostError, match="MemTotal"):
        HostCapacity.from_host(meminfo)
    with pytest.raises(HostError):
        HostCapacity.from_host(tmp_path / "missing")
    with pytest.raises(SpecError):
        HostCapacity(memory_mib=0, cpus=1)


def test_capacity_of_this_host() -> None:
    cap = HostCapacity.from_host()
    assert cap.memory_mib > 0 and cap.cpus >= 1


def test_create_is_check_plus_insert_in_one_transaction(tmp_path: Path) -> None:
    """The daemon's create, end to end: fill the host, be refused without a trace, free a VM."""
    policy = AdmissionPolicy(reserved_host_memory_mib=0, vm_overhead_mib=64, vcpu_overcommit=1.0)
    capacity = HostCapacity(memory_mib=1024, cpus=4)

    def create(store: Store, vm_id: str, memory: int) -> None:
        spec = VMSpec(memory_mib=memory, vcpus=1)

        def gate(r: Reservations) -> None:
            check(
                policy,
                capacity,
                reserved_memory_mib=r.memory_mib,
                reserved_vcpus=r.vcpus,
                reserved_vms=r.vms,
                request_memory_mib=spec.memory_mib,
                request_vcpus=spec.vcpus,
            )

        store.create_vm(vm_id, spec, admit=gate)

    with Store(tmp_path / "state.db") as store:
        create(store, "a", 448)  # 512 charged
        create(store, "b", 448)  # 1024 charged: exactly full
        events = store.events_since(0)
        with pytest.raises(AdmissionError, match="memory"):
            create(store, "c", 128)
        assert store.get_vm("c") is None and store.events_since(0) == events
        store.update_state("a", VMState.FAILED)
        create(store, "c", 448)
        assert store.reservations() == Reservations(memory_mib=896, vcpus=2, vms=2)
