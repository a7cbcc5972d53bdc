"""The states of a VM's life, shared by the engine and the manager's store (no heavy imports)."""

from __future__ import annotations

import enum


class VMState(enum.StrEnum):
    """creating -> running -> stopping -> stopped, or failed from any of the first three."""

    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
