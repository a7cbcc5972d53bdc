"""Admission control: refuse a create that would pass the host's memory or vcpu limit.

The limits, for a host with ``M`` MiB of memory and ``C`` CPUs::

    memory: sum over active VMs of (memory_mib + vm_overhead_mib)
            <= floor((M - reserved_host_memory_mib) * memory_overcommit)
    vcpus:  sum over active VMs of vcpus <= floor(C * vcpu_overcommit)

Active VMs are those in ``creating``, ``running`` or ``stopping`` (``store.ACTIVE_STATES``).
Exactly at a limit is admitted.

:func:`check` is pure, so the daemon runs it inside the write transaction that inserts the VM
row: the reservations it sees cannot change before the insert, and a refused create writes
nothing. That is the whole of an atomic create::

    def admit(reserved: Reservations) -> None:
        check(
            policy, capacity,
            reserved_memory_mib=reserved.memory_mib, reserved_vcpus=reserved.vcpus,
            reserved_vms=reserved.vms,
            request_memory_mib=spec.memory_mib, request_vcpus=spec.vcpus,
        )

    row = await asyncio.to_thread(store.create_vm, vm_id, spec, admit=admit)
    # AdmissionError (-> HTTP 409) or NameConflictError (-> 409) leave no row and no event.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

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
    """Host memory charged per VM on top of its guest memory (QEMU itself)."""

    def __post_init__(self) -> None:
        for field in ("memory_overcommit", "vcpu_overcommit"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(f"{field} must be a positive number (got {value!r})")
        for field in ("reserved_host_memory_mib", "vm_overhead_mib"):
            if getattr(self, field) < 0:
                raise SpecError(f"{field} must be 0 or more (got {getattr(self, field)!r})")

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
            "create refused, it would pass this host's limits:\n  " + "\n  ".join(problems)
        )
