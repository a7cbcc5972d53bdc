"""The API's request and response models, declared once for every route."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from warden.agent.client import EntryInfo
from warden.store.db import EventRow, VMRow
from warden.vmm.state import VMState


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    image: str = "default"
    memory_mib: int = 256
    vcpus: int = 1
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: list[str] | str = Field(min_length=1)
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(default=None, description="base64 of the whole stdin")
    stdin_stream: bool = Field(
        default=False,
        description="stdin comes as the body of PUT .../execs/{exec_id}/stdin; the exec_id is "
        "the first line of the output stream",
    )
    timeout: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_stdin(self) -> ExecRequest:
        if self.stdin is not None and self.stdin_stream:
            raise ValueError("give stdin or stdin_stream, not both")
        return self


class Sandbox(BaseModel):
    id: str
    name: str | None
    state: VMState
    image: str
    vcpus: int
    memory_mib: int
    labels: dict[str, str]
    created_at: float
    started_at: float | None
    stopped_at: float | None
    uptime_s: float | None
    cpu_percent: float | None = Field(
        description="CPU use of the VM's QEMU over the last second, in percent of one CPU"
    )
    pid: int | None
    exit_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: VMRow, cpu_percent: float | None = None) -> Sandbox:
        running = row.state is VMState.RUNNING and row.started_at is not None
        return cls(
            id=row.id,
            name=row.name,
            state=row.state,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            labels=row.labels,
            created_at=row.created_at,
            started_at=row.started_at,
            stopped_at=row.stopped_at,
            uptime_s=time.time() - row.started_at if running and row.started_at else None,
            cpu_percent=None if cpu_percent is None else round(cpu_percent, 1),
            pid=row.qemu_pid if row.state is VMState.RUNNING else None,
            exit_code=row.exit_code,
            error=row.error,
        )


class Entry(BaseModel):
    """A file system entry in the guest (``lstat``: symlinks are not followed)."""

    name: str
    path: str
    type: str = Field(description='"file", "dir", "symlink" or "other"')
    size: int
    mode: int = Field(description="permission bits, e.g. 420 (0o644)")
    mtime: float

    @classmethod
    def from_info(cls, info: EntryInfo) -> Entry:
        return cls(
            name=info.name,
            path=info.path,
            type=info.type,
            size=info.size,
            mode=info.mode,
            mtime=info.mtime,
        )


class Event(BaseModel):
    """A lifecycle event of a VM: ``created``, a state (``running``, ``stopping``,
    ``stopped``, ``failed``) or ``removed``. Ids grow in commit order."""

    id: int
    vm_id: str
    at: float
    kind: str
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: EventRow) -> Event:
        return cls(id=row.id, vm_id=row.vm_id, at=row.at, kind=row.kind, detail=row.detail)
