"""Admission control: refuse a create that would pass the host's memory or CPU limits.

Two ways to charge a VM (``AdmissionPolicy.charge``). For a host with ``M`` MiB of memory and
``C`` CPUs, every active VM (``creating``, ``running``, ``unhealthy``, ``stopping``) and the
new one are charged, and a create is admitted when, with it::

    memory:   sum of memory charges  <= floor((M - reserved_host_memory_mib) * memory_overcommit)
    vcpus:    sum of vCPU charges    <= floor(C * vcpu_overcommit)
    cpu_busy: measured load of VMs   <= C * cpu_busy_limit          ("measured" only)

``charge="limits"``: each VM is charged what its cgroup lets it take: guest memory plus
``vm_overhead_mib`` (QEMU), and all of its vCPUs. Nothing is overcommitted unless a ratio says so.

``charge="measured"`` (the default; issue 8): each VM is charged what it uses, measured by the
daemon (``policy/meter.py``), so idle VMs do not hold the host's resources they do not touch:

* memory: its QEMU's PSS (``/proc/<pid>/smaps_rollup``, read every 5 s; 30 s when idle) plus
  ``vm_headroom_mib`` to grow into before the next sample. A VM not measured yet (still
  creating, or running for less than ``meter.SETTLE_S``) is charged ``vm_footprint_mib`` plus
  the headroom: the PSS of an idle VM measured at start-up (``policy/footprint.py``); before
  that calibration, its limit. Never more than its limit (guest + overhead), which its cgroup
  enforces: a VM cannot take more than it is charged by more than the growth one sample
  interval allows, and that is what the headroom and ``reserved_host_memory_mib`` cover.
* vCPUs: the CPUs its QEMU used over the last ``meter.WINDOW_S`` (CPU time from
  ``/proc/<pid>/stat``); all of its vCPUs while not measured over a whole window (a new VM
  boots flat out); nothing while paused. 200 idle VMs at ~0.5% of a CPU each are charged
  about one CPU.
* cpu_busy: whatever the ratios allow, a host whose VMs used more than ``cpu_busy_limit`` of
  its CPUs over the last window (measured VMs only) admits nothing new.

:func:`check_usage` (and :func:`check`, the limits rule on totals) are pure, so the daemon runs
them inside the write transaction that inserts the VM row: the VMs they see cannot change
before the insert, and a refused create writes nothing. Parallel creates are decided one after
the other, each seeing the ones before it charged in full (unmeasured)::

    def admit(reserved: Reservations) -> None:
        vms = [meter.usage(vm) for vm in reserved.active]
        check_usage(policy, capacity, vms, request=VMUsage(spec.memory_mib, spec.vcpus))

    row = await asyncio.to_thread(store.create_vm, vm_id, spec, admit=admit)
    # AdmissionError (-> HTTP 409) or NameConflictError (-> 409) leave no row and no event.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from warden._errors import AdmissionError, HostError, SpecError
from warden.vmm.argv import TCG_TB_SIZE_MIB

# What one QEMU microVM process takes of host memory besides guest RAM: the binary and its
# libraries, device state, virtio queues and I/O buffers, QMP and chardev buffers. An estimate,
# rounded up, for admission only (it is not a limit on the process).
QEMU_BASE_OVERHEAD_MIB = 64

# Under TCG each VM also has a translation-block cache of TCG_TB_SIZE_MIB (vmm/argv.py), touched
# as guest code is translated, so a long-lived VM can grow to hold all of it. Under KVM there is
# no such cache: a KVM-only host can set vm_overhead_mib=QEMU_BASE_OVERHEAD_MIB.
TCG_VM_OVERHEAD_MIB = QEMU_BASE_OVERHEAD_MIB + TCG_TB_SIZE_MIB

Charge = Literal["measured", "limits"]
CHARGES: tuple[Charge, ...] = ("measured", "limits")
DEFAULT_HEADROOM_MIB = 32
"""Memory charged on top of a VM's measured PSS: room for it to grow between two samples."""
DEFAULT_CPU_BUSY_LIMIT = 0.9


@dataclass(frozen=True)
class HostCapacity:
    """What the host has: total memory in MiB and CPUs."""

    memory_mib: int
    cpus: int

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.cpus <= 0:
            raise SpecError(
                f"host capacity must be positive (got memory_mib={self.memory_mib}, "
                f"cpus={self.cpus})"
            )

    @classmethod
    def from_host(cls, meminfo: Path = Path("/proc/meminfo")) -> HostCapacity:
        """MemTotal from ``/proc/meminfo`` and ``os.cpu_count()``."""
        try:
            text = meminfo.read_text()
        except OSError as exc:
            raise HostError(f"cannot read the host's memory size from {meminfo}: {exc}") from exc
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "MemTotal:" and fields[1].isdigit():
                return cls(memory_mib=int(fields[1]) // 1024, cpus=os.cpu_count() or 1)
        raise HostError(f"{meminfo} has no MemTotal line; cannot size the host's memory")


@dataclass(frozen=True)
class AdmissionPolicy:
    """The operator's limits. The field names are the option names the refusals quote."""

    memory_overcommit: float = 1.0
    """Admit guest memory (plus overhead) up to this multiple of the host memory left over."""
    vcpu_overcommit: float = 4.0
    """Admit vcpus up to this multiple of the host's CPUs."""
    reserved_host_memory_mib: int = 512
    """Host memory never handed to VMs (the kernel, the daemon, everything else)."""
    vm_overhead_mib: int = TCG_VM_OVERHEAD_MIB
    """Host memory a VM may take on top of its guest memory (QEMU itself): with the guest
    memory, its cgroup's limit, and what ``charge="limits"`` charges."""
    charge: Charge = "measured"
    """``measured``: charge VMs what they use (PSS, CPU load); ``limits``: what they may use."""
    vm_footprint_mib: int | None = None
    """The PSS of an idle VM, charged (plus headroom) to a VM not measured yet; None: not
    calibrated, such a VM is charged its limit."""
    vm_headroom_mib: int = DEFAULT_HEADROOM_MIB
    """Memory charged per VM on top of its measured (or calibrated) footprint."""
    cpu_busy_limit: float = DEFAULT_CPU_BUSY_LIMIT
    """Refuse creates while the VMs' measured load passes this fraction of the host's CPUs."""

    def __post_init__(self) -> None:
        for field in ("memory_overcommit", "vcpu_overcommit", "cpu_busy_limit"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(f"{field} must be a positive number (got {value!r})")
        for field in ("reserved_host_memory_mib", "vm_overhead_mib", "vm_headroom_mib"):
            if getattr(self, field) < 0:
                raise SpecError(f"{field} must be 0 or more (got {getattr(self, field)!r})")
        if self.vm_footprint_mib is not None and self.vm_footprint_mib <= 0:
            raise SpecError(
                f"vm_footprint_mib must be a positive number of MiB (got {self.vm_footprint_mib!r})"
            )
        if self.charge not in CHARGES:
            raise SpecError(f"charge must be one of {', '.join(CHARGES)} (got {self.charge!r})")

    def memory_limit_mib(self, capacity: HostCapacity) -> int:
        """The most memory (guest + overhead, summed over active VMs) this host admits."""
        usable = max(capacity.memory_mib - self.reserved_host_memory_mib, 0)
        return math.floor(usable * self.memory_overcommit)

    def vcpu_limit(self, capacity: HostCapacity) -> int:
        """The most vcpus (summed over active VMs) this host admits."""
        return math.floor(capacity.cpus * self.vcpu_overcommit)

    def charge_mib(self, memory_mib: int, vms: int = 1) -> int:
        """Host memory charged for ``vms`` VMs holding ``memory_mib`` of guest memory in all."""
        return memory_mib + vms * self.vm_overhead_mib


def check(
    policy: AdmissionPolicy,
    capacity: HostCapacity,
    *,
    reserved_memory_mib: int,
    reserved_vcpus: int,
    reserved_vms: int,
    request_memory_mib: int,
    request_vcpus: int,
) -> None:
    """Admit one more VM, or raise AdmissionError naming every limit it would pass.

    ``reserved_*`` describe the active VMs (``Store.reservations()``): their summed guest
    memory and vcpus, and their count, which charges each its ``vm_overhead_mib``.
    Keyword-only, so memory and vcpus cannot be swapped by position.
    """
    problems: list[str] = []

    memory_limit = policy.memory_limit_mib(capacity)
    reserved = policy.charge_mib(reserved_memory_mib, reserved_vms)
    needed = policy.charge_mib(request_memory_mib)
    if reserved + needed > memory_limit:
        problems.append(
            f"memory: this VM needs {needed} MiB ({request_memory_mib} MiB guest + "
            f"{policy.vm_overhead_mib} MiB QEMU overhead), {reserved_vms} active VMs hold "
            f"{reserved} MiB, and the limit is {memory_limit} MiB (({capacity.memory_mib} MiB "
            f"host - reserved_host_memory_mib {policy.reserved_host_memory_mib}) x "
            f"memory_overcommit {policy.memory_overcommit:g}). Ask for less memory, stop or "
            "remove VMs, or raise memory_overcommit."
        )

    vcpu_limit = policy.vcpu_limit(capacity)
    if reserved_vcpus + request_vcpus > vcpu_limit:
        problems.append(
            f"vcpus: this VM needs {request_vcpus}, {reserved_vms} active VMs hold "
            f"{reserved_vcpus}, and the limit is {vcpu_limit} ({capacity.cpus} host CPUs x "
            f"vcpu_overcommit {policy.vcpu_overcommit:g}). Ask for fewer vcpus, stop or "
            "remove VMs, or raise vcpu_overcommit."
        )

    if problems:
        raise AdmissionError(
            "create refused, it would pass this host's limits:\n  " + "\n  ".join(problems),
            limits=tuple(p.split(":", 1)[0] for p in problems),
        )


@dataclass(frozen=True)
class VMUsage:
    """One VM as ``charge="measured"`` sees it: its size, and what it was measured to use
    (None: not measured yet; see ``policy/meter.py`` for when a VM counts as measured)."""

    memory_mib: int
    vcpus: int
    pss_mib: float | None = None
    """Its QEMU's PSS, in MiB."""
    cpu_load: float | None = None
    """CPUs its QEMU used over the last window (1.0: one CPU busy all the time)."""
    paused: bool = False


def memory_charge_mib(policy: AdmissionPolicy, vm: VMUsage) -> int:
    """The memory ``vm`` is charged: its measured PSS (else the calibrated footprint, else its
    limit) plus the headroom, at most its limit (guest + QEMU overhead, its cgroup's)."""
    limit = vm.memory_mib + policy.vm_overhead_mib
    if policy.charge == "limits":
        return limit
    if vm.pss_mib is not None:
        used = math.ceil(vm.pss_mib)
    elif policy.vm_footprint_mib is not None:
        used = policy.vm_footprint_mib
    else:
        return limit
    return min(limit, used + policy.vm_headroom_mib)


def vcpu_charge(policy: AdmissionPolicy, vm: VMUsage) -> float:
    """The vCPUs ``vm`` is charged: none if paused, else its measured load, else all of them."""
    if policy.charge == "limits":
        return float(vm.vcpus)
    if vm.paused:
        return 0.0
    return float(vm.vcpus) if vm.cpu_load is None else vm.cpu_load


@dataclass(frozen=True)
class Charges:
    """What active VMs are charged in all, and how many of them were measured."""

    memory_mib: int
    vcpus: float
    measured_load: float
    """The CPU load of the measured VMs (what ``cpu_busy`` compares)."""
    vms: int
    measured: int

    @classmethod
    def of(cls, policy: AdmissionPolicy, vms: Sequence[VMUsage]) -> Charges:
        return cls(
            memory_mib=sum(memory_charge_mib(policy, vm) for vm in vms),
            vcpus=sum(vcpu_charge(policy, vm) for vm in vms),
            measured_load=sum(
                vm.cpu_load for vm in vms if vm.cpu_load is not None and not vm.paused
            ),
            vms=len(vms),
            measured=sum(1 for vm in vms if vm.pss_mib is not None or vm.cpu_load is not None),
        )


def check_usage(
    policy: AdmissionPolicy,
    capacity: HostCapacity,
    vms: Sequence[VMUsage],
    *,
    request: VMUsage,
) -> None:
    """Admit ``request`` (a new VM: charged as not measured) next to the active ``vms``, or
    raise AdmissionError naming every limit it would pass (``limits`` lists them)."""
    if policy.charge == "limits":
        check(
            policy,
            capacity,
            reserved_memory_mib=sum(vm.memory_mib for vm in vms),
            reserved_vcpus=sum(vm.vcpus for vm in vms),
            reserved_vms=len(vms),
            request_memory_mib=request.memory_mib,
            request_vcpus=request.vcpus,
        )
        return
    held = Charges.of(policy, vms)
    problems = [
        p
        for p in (
            _memory_problem(policy, capacity, held, request),
            _vcpu_problem(policy, capacity, held, request),
            _busy_problem(policy, capacity, held),
        )
        if p is not None
    ]
    if problems:
        raise AdmissionError(
            "create refused, it would pass this host's limits:\n  " + "\n  ".join(problems),
            limits=tuple(p.split(":", 1)[0] for p in problems),
        )


def _memory_problem(
    policy: AdmissionPolicy, capacity: HostCapacity, held: Charges, request: VMUsage
) -> str | None:
    limit = policy.memory_limit_mib(capacity)
    needed = memory_charge_mib(policy, request)
    if held.memory_mib + needed <= limit:
        return None
    how = (
        f"the calibrated footprint of an idle VM, {policy.vm_footprint_mib} MiB, + "
        f"vm_headroom_mib {policy.vm_headroom_mib}"
        if needed < request.memory_mib + policy.vm_overhead_mib
        else f"{request.memory_mib} MiB guest + {policy.vm_overhead_mib} MiB QEMU overhead"
    )
    return (
        f"memory: this VM is charged {needed} MiB ({how}), {held.vms} active VMs are charged "
        f"{held.memory_mib} MiB ({held.measured} of them by their measured PSS + "
        f"{policy.vm_headroom_mib} MiB), and the limit is {limit} MiB (({capacity.memory_mib} "
        f"MiB host - reserved_host_memory_mib {policy.reserved_host_memory_mib}) x "
        f"memory_overcommit {policy.memory_overcommit:g}). Ask for less memory, stop or "
        "remove VMs, or raise memory_overcommit."
    )


def _vcpu_problem(
    policy: AdmissionPolicy, capacity: HostCapacity, held: Charges, request: VMUsage
) -> str | None:
    limit = policy.vcpu_limit(capacity)
    if held.vcpus + request.vcpus <= limit:
        return None
    return (
        f"vcpus: this VM is charged {request.vcpus} (all of its vCPUs until it is measured), "
        f"{held.vms} active VMs are charged {held.vcpus:.2f} ({held.measured} of them by their "
        f"measured CPU load), and the limit is {limit} ({capacity.cpus} host CPUs x "
        f"vcpu_overcommit {policy.vcpu_overcommit:g}). Ask for fewer vcpus, wait for new VMs "
        "to settle, stop or remove VMs, or raise vcpu_overcommit."
    )


def _busy_problem(policy: AdmissionPolicy, capacity: HostCapacity, held: Charges) -> str | None:
    limit = capacity.cpus * policy.cpu_busy_limit
    if held.measured_load <= limit:
        return None
    return (
        f"cpu_busy: the VMs used {held.measured_load:.2f} of this host's {capacity.cpus} CPUs "
        f"over the last measurement window, more than {limit:.2f} ({capacity.cpus} CPUs x "
        f"cpu_busy_limit {policy.cpu_busy_limit:g}). Wait for them to finish, stop or pause "
        "VMs, or raise cpu_busy_limit."
    )
