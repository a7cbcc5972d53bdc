"""Admission control: limits at their boundaries, ratios, per-VM overhead, and the message."""

from __future__ import annotations

import os
import threading
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
from warden.policy.admission import (
    DEFAULT_HEADROOM_MIB,
    VMUsage,
    check_usage,
    memory_charge_mib,
    vcpu_charge,
)
from warden.policy.meter import (
    MEMORY_EVERY_S,
    MEMORY_IDLE_EVERY_S,
    SETTLE_S,
    WINDOW_S,
    UsageMeter,
    pss_mib,
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


# -- charge="measured": what VMs really use (issue 8) --------------------------------------

HOST = HostCapacity(memory_mib=24105, cpus=2)  # this machine: 24 GiB, 2 cores


def usage_check(
    policy: AdmissionPolicy, vms: list[VMUsage], memory: int = 256, vcpus: int = 1
) -> None:
    check_usage(policy, HOST, vms, request=VMUsage(memory, vcpus))


def test_a_measured_vm_is_charged_its_pss_plus_headroom_at_most_its_limit() -> None:
    p = AdmissionPolicy(vm_footprint_mib=175, vm_headroom_mib=32, vm_overhead_mib=320)
    assert memory_charge_mib(p, VMUsage(256, 1, pss_mib=59.2)) == 60 + 32
    assert memory_charge_mib(p, VMUsage(256, 1)) == 175 + 32  # not measured: the footprint
    assert memory_charge_mib(p, VMUsage(256, 1, pss_mib=900.0)) == 256 + 320  # its cgroup's
    assert memory_charge_mib(p, VMUsage(128, 1)) == min(128 + 320, 175 + 32)
    uncalibrated = AdmissionPolicy(vm_footprint_mib=None)
    assert memory_charge_mib(uncalibrated, VMUsage(256, 1)) == 256 + TCG_VM_OVERHEAD_MIB
    limits = AdmissionPolicy(charge="limits", vm_footprint_mib=175)
    assert memory_charge_mib(limits, VMUsage(256, 1, pss_mib=60.0)) == 256 + TCG_VM_OVERHEAD_MIB


def test_cpu_charge_is_measured_load_all_vcpus_until_measured_and_none_paused() -> None:
    p = AdmissionPolicy()
    assert vcpu_charge(p, VMUsage(256, 2)) == 2.0
    assert vcpu_charge(p, VMUsage(256, 2, cpu_load=0.006)) == 0.006
    assert vcpu_charge(p, VMUsage(256, 2, cpu_load=0.5, paused=True)) == 0.0
    assert vcpu_charge(p, VMUsage(256, 2, paused=True)) == 0.0
    assert vcpu_charge(AdmissionPolicy(charge="limits"), VMUsage(256, 2, cpu_load=0.0)) == 2.0


def test_200_idle_sandboxes_fit_with_the_default_settings() -> None:
    """Idle 256 MiB clones (PSS ~60 MiB, ~0.5% of a CPU each, as measured here) on this 24 GiB,
    2-core host: the 201st is admitted; the limits rule refused the 9th (vCPUs 4 x 2)."""
    p = AdmissionPolicy(vm_footprint_mib=175)
    idle = [VMUsage(256, 1, pss_mib=60.0, cpu_load=0.005) for _ in range(200)]
    usage_check(p, idle)
    with pytest.raises(AdmissionError) as info:
        usage_check(AdmissionPolicy(charge="limits"), idle[:8])
    assert info.value.limits == ("vcpus",)


def test_a_host_whose_vms_keep_the_cpus_busy_refuses_creates() -> None:
    p = AdmissionPolicy(vm_footprint_mib=175)
    busy = [VMUsage(256, 1, pss_mib=180.0, cpu_load=0.95) for _ in range(2)]
    with pytest.raises(AdmissionError) as info:
        usage_check(p, busy)
    assert info.value.limits == ("cpu_busy",)
    assert "cpu_busy_limit 0.9" in str(info.value) and "1.90 of this host's 2 CPUs" in str(
        info.value
    )
    usage_check(AdmissionPolicy(vm_footprint_mib=175, cpu_busy_limit=1.0), busy)
    paused = [VMUsage(256, 1, pss_mib=180.0, cpu_load=0.95, paused=True) for _ in range(2)]
    usage_check(p, paused)  # a paused VM's last load does not count


def test_vms_not_measured_yet_are_charged_in_full() -> None:
    """A burst of creates: 8 VMs still booting hold 8 vCPUs (2 CPUs x 4), so a 9th waits;
    once they are measured idle, there is room again."""
    p = AdmissionPolicy(vm_footprint_mib=175)
    booting = [VMUsage(256, 1) for _ in range(8)]
    with pytest.raises(AdmissionError) as info:
        usage_check(p, booting)
    assert info.value.limits == ("vcpus",)
    assert "all of its vCPUs until it is measured" in str(info.value)
    usage_check(p, [VMUsage(256, 1, cpu_load=0.01) for _ in range(8)])


def test_memory_at_the_limit_under_measured_charges() -> None:
    # 1000 MiB for VMs: 4 measured at 100 + 20 headroom = 480; 520 left, a new VM costs
    # footprint 240 + 20 = 260: two fit, a third does not.
    p = AdmissionPolicy(reserved_host_memory_mib=0, vm_footprint_mib=240, vm_headroom_mib=20)
    cap = HostCapacity(memory_mib=1000, cpus=64)
    measured = [VMUsage(256, 1, pss_mib=100.0, cpu_load=0.0) for _ in range(4)]
    check_usage(p, cap, [*measured, VMUsage(256, 1)], request=VMUsage(256, 1))
    with pytest.raises(AdmissionError) as info:
        check_usage(p, cap, [*measured, VMUsage(256, 1), VMUsage(256, 1)], request=VMUsage(256, 1))
    assert info.value.limits == ("memory",)
    msg = str(info.value)
    for part in (
        "charged 260 MiB",
        "footprint of an idle VM, 240 MiB",
        "6 active VMs are charged 1000 MiB (4 of them by their measured PSS",
        "the limit is 1000 MiB",
    ):
        assert part in msg, (part, msg)


def test_limits_charge_is_the_rule_on_totals() -> None:
    p = AdmissionPolicy(charge="limits", reserved_host_memory_mib=96, vm_overhead_mib=100)
    vms = [VMUsage(500, 1, pss_mib=10.0, cpu_load=0.0) for _ in range(2)]
    check_usage(p, CAP, vms, request=VMUsage(2700, 1))
    with pytest.raises(AdmissionError, match="needs 2801 MiB") as info:
        check_usage(p, CAP, vms, request=VMUsage(2701, 1))
    assert info.value.limits == ("memory",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_busy_limit": 0.0},
        {"cpu_busy_limit": float("nan")},
        {"vm_headroom_mib": -1},
        {"vm_footprint_mib": 0},
        {"charge": "guess"},
    ],
)
def test_bad_measured_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(SpecError, match=next(iter(kwargs))):
        AdmissionPolicy(**kwargs)  # type: ignore[arg-type]


def test_parallel_creates_at_the_limit_admit_exactly_n(tmp_path: Path) -> None:
    """N + k threads, each with its own connection (as parallel API requests, or processes),
    check and insert through the meter's charges: exactly N rows, the others refused with
    nothing written, as the daemon's gate does it."""
    n, k = 5, 7
    charge = 175 + DEFAULT_HEADROOM_MIB  # a VM not measured yet
    cap = HostCapacity(memory_mib=n * charge + charge // 2, cpus=64)
    policy = AdmissionPolicy(reserved_host_memory_mib=0, vm_footprint_mib=175)
    meter = UsageMeter()
    path = tmp_path / "state.db"
    Store(path).close()
    barrier = threading.Barrier(n + k)
    errors: list[AdmissionError] = []

    def create(i: int) -> None:
        def gate(r: Reservations) -> None:
            vms = [meter.usage(v.id, v.memory_mib, v.vcpus) for v in r.active]
            check_usage(policy, cap, vms, request=VMUsage(256, 1))

        with Store(path) as store:
            barrier.wait()
            try:
                store.create_vm(f"vm{i}", VMSpec(memory_mib=256), admit=gate)
            except AdmissionError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n + k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == k
    assert all(e.limits == ("memory",) for e in errors)
    with Store(path) as store:
        assert store.reservations().vms == n
        assert len(store.events_since(0)) == n


# -- the meter ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_meter_measures_load_over_a_whole_window_only() -> None:
    clock = FakeClock()
    meter = UsageMeter(clock)
    cpu = {"a": 0.0}
    for _ in range(int(WINDOW_S)):
        meter.sample_cpu({"a": 1}, read=lambda pid: cpu["a"])
        assert meter.usage("a", 256, 1).cpu_load is None  # not a whole window yet
        clock.now += 1.0
        cpu["a"] += 0.25
    meter.sample_cpu({"a": 1}, read=lambda pid: cpu["a"])
    assert meter.usage("a", 256, 1).cpu_load == pytest.approx(0.25)
    for _ in range(10):  # idle from now on: the window slides past the busy part
        clock.now += 1.0
        meter.sample_cpu({"a": 1}, read=lambda pid: cpu["a"])
    assert meter.usage("a", 256, 1).cpu_load == pytest.approx(0.0)


def test_the_meter_counts_pss_only_once_a_vm_has_settled() -> None:
    clock = FakeClock()
    meter = UsageMeter(clock)
    meter.sample_cpu({"a": 1}, read=lambda pid: 1.0)
    meter.sample_memory({"a": 1}, read=lambda pid: 40.0)  # still restoring: not counted
    assert meter.usage("a", 256, 1).pss_mib is None
    clock.now += SETTLE_S
    meter.sample_memory({"a": 1}, read=lambda pid: 170.0)
    assert meter.usage("a", 256, 1).pss_mib == 170.0
    meter.sample_memory({"a": 1}, read=lambda pid: None)  # gone between samples: kept
    assert meter.usage("a", 256, 1).pss_mib == 170.0
    meter.sample_cpu({}, read=lambda pid: 1.0)  # not running any more: forgotten
    assert meter.usage("a", 256, 1) == VMUsage(256, 1)


def test_pss_is_read_again_soon_only_for_vms_that_ran() -> None:
    """Reading PSS costs ~1.5 ms of CPU per VM: an idle VM is read every MEMORY_IDLE_EVERY_S,
    one whose QEMU used CPU since its last reading every MEMORY_EVERY_S, none before it
    settled, and each when it is due (not all at once)."""
    clock = FakeClock()
    meter = UsageMeter(clock)
    running = {"busy": 1, "idle": 2}
    cpu = {1: 1.0, 2: 1.0}

    def tick(seconds: float) -> dict[str, int]:
        clock.now += seconds
        meter.sample_cpu(running, read=lambda pid: cpu[pid])
        due = meter.memory_due(running)
        meter.sample_memory(due, read=lambda pid: 60.0)
        return due

    assert tick(0) == {}  # not settled: its PSS would not count
    assert tick(SETTLE_S) == running  # the first reading of each
    assert tick(MEMORY_EVERY_S - 1) == {}
    cpu[1] += 0.5
    assert tick(1) == {"busy": 1}  # it ran: read again
    assert tick(MEMORY_EVERY_S) == {}  # neither ran since
    assert tick(MEMORY_IDLE_EVERY_S - 2 * MEMORY_EVERY_S) == {"idle": 2}
    assert tick(MEMORY_IDLE_EVERY_S - MEMORY_EVERY_S) == {"busy": 1}
    assert meter.usage("idle", 256, 1).pss_mib == 60.0
    del running["busy"]
    meter.sample_cpu(running, read=lambda pid: cpu[pid])
    assert meter.memory_due({"busy": 1}) == {}  # forgotten: it starts over, unsettled


def test_pss_of_this_process() -> None:
    pss = pss_mib(os.getpid())
    assert pss is not None and 1 < pss < 4096
    assert pss_mib(2**22 + 1) is None
