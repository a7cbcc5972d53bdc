"""Host policy of the manager: admission control (what may be created on this host)."""

from __future__ import annotations

from warden.policy.admission import (
    QEMU_BASE_OVERHEAD_MIB,
    TCG_VM_OVERHEAD_MIB,
    AdmissionPolicy,
    HostCapacity,
    check,
)

__all__ = [
    "QEMU_BASE_OVERHEAD_MIB",
    "TCG_VM_OVERHEAD_MIB",
    "AdmissionPolicy",
    "HostCapacity",
    "check",
]
