"""The states of a VM's life and the one table of allowed changes, shared by the engine
(``Machine``) and the manager's store (no heavy imports)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from warden._errors import StateTransitionError


class VMState(enum.StrEnum):
    """creating -> running -> stopping -> stopped, or failed; running -> unhealthy when the
    guest agent stops answering or breaks the protocol; running <-> paused (its state saved
    to a sealed file and QEMU ended, ``vmm/pause.py``) (see TRANSITIONS).

    An auto-paused VM (QMP ``stop`` after an idle time, ``vmm/idle.py``) stays ``running``:
    its QEMU and memory are there, and the next request resumes it; ``ps`` flags it."""

    CREATING = "creating"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


TRANSITIONS: Mapping[VMState, frozenset[VMState]] = {
    VMState.CREATING: frozenset({VMState.RUNNING, VMState.FAILED}),
    VMState.RUNNING: frozenset(
        {VMState.UNHEALTHY, VMState.PAUSED, VMState.STOPPING, VMState.STOPPED, VMState.FAILED}
    ),
    # paused -> running by a resume; a paused VM has no QEMU, so stopping it only removes
    # its saved state; failed when its saved state cannot be loaded any more.
    VMState.PAUSED: frozenset({VMState.RUNNING, VMState.STOPPING, VMState.STOPPED, VMState.FAILED}),
    # unhealthy -> running only when a new manager reattaches and the agent answers a fresh
    # session again; an unhealthy VM otherwise only goes down.
    VMState.UNHEALTHY: frozenset(
        {VMState.RUNNING, VMState.STOPPING, VMState.STOPPED, VMState.FAILED}
    ),
    VMState.STOPPING: frozenset({VMState.STOPPED, VMState.FAILED}),
    VMState.STOPPED: frozenset(),
    VMState.FAILED: frozenset(),
}
"""The allowed ``from -> to`` state changes. stopped and failed are final."""

LIVE_STATES: frozenset[VMState] = frozenset({VMState.RUNNING, VMState.UNHEALTHY})
"""States whose QEMU runs and may be stopped (an unhealthy VM's agent does not answer)."""


def check_transition(vm_id: str, old: VMState, new: VMState) -> None:
    """Raise StateTransitionError unless TRANSITIONS allows ``old -> new``."""
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(TRANSITIONS[old])) or "none, it is final"
        raise StateTransitionError(
            f"VM {vm_id} is {old.value} and cannot become {new.value} "
            f"(allowed from {old.value}: {allowed})"
        )
