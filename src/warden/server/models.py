"""The API's request and response models, declared once for every route."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from warden.agent.client import EntryInfo
from warden.server.limits import (
    MAX_ARG,
    MAX_ARGV,
    MAX_EXEC_TIMEOUT_S,
    MAX_MEMORY_MIB,
    Arg,
    Base64,
    Env,
    GuestPath,
    Labels,
    Timeout,
    WorkloadUser,
    no_nul,
)
from warden.store.db import EventRow, VMRow
from warden.vmm.spec import MAX_VCPUS, MIN_MEMORY_MIB
from warden.vmm.state import LIVE_STATES, VMState


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, min_length=1, max_length=63, description="unique, [a-z0-9][a-z0-9_.-]*"
    )
    image: str = Field(default="default", min_length=1, max_length=63)
    memory_mib: int = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    env: Env = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    template: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="clone this template (`warden template list`): its image, memory and vCPUs "
        "are the clone's; leave those unset",
    )
    boot: Literal["snapshot", "cold"] = Field(
        default="snapshot",
        description="'snapshot' clones the automatic boot template of this shape (made by the "
        "first such create); 'cold' boots from scratch (a VM to save as a template whose "
        "clones share all its memory)",
    )
    require_jail: bool = Field(
        default=False,
        description="refuse the create (409, nothing recorded) unless QEMU gets every jail "
        "feature on the daemon's host (`warden doctor` lists them); without it a missing "
        "feature is a logged downgrade (unless the daemon runs with --require-jail)",
    )


Argv = Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGV)]
ShellLine = Annotated[str, Field(min_length=1, max_length=MAX_ARG), AfterValidator(no_nul)]


def _cmd_kind(value: object) -> str:
    return "shell" if isinstance(value, str) else "argv"


Cmd = Annotated[
    Annotated[Argv, Tag("argv")] | Annotated[ShellLine, Tag("shell")],
    Discriminator(_cmd_kind),
]
"""A command: an argv list, or one line for ``/bin/sh -c``. A problem is reported in the
form given (``cmd.argv.0``, ``cmd.shell``), not in both."""


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: Cmd = Field(description="an argv list, or a line for /bin/sh -c")
    env: Env | None = None
    cwd: GuestPath | None = Field(default=None, description="default: the user's home")
    stdin: Base64 | None = Field(
        default=None,
        description="base64 of the whole stdin (the body is at most 1 MiB: stream more with "
        "stdin_stream)",
    )
    stdin_stream: bool = Field(
        default=False,
        description="stdin comes as the body of PUT .../execs/{exec_id}/stdin; the exec_id is "
        "the first line of the output stream",
    )
    timeout: Timeout | None = Field(
        default=None, description=f"seconds, at most {MAX_EXEC_TIMEOUT_S:g}"
    )
    user: WorkloadUser = Field(
        default="user",
        description='"user" (uid 1000) or "root"; root needs the policy\'s exec-as-root action '
        "(403 without it)",
    )

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
    owner: str = Field(description="the principal that created it (the access policy's owner)")
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
    idle_paused: bool = Field(
        False,
        description="a running VM whose vCPUs the daemon stopped after its idle time "
        "(`warden serve --auto-pause`); the next request continues it",
    )

    @classmethod
    def from_row(
        cls, row: VMRow, cpu_percent: float | None = None, *, idle_paused: bool = False
    ) -> Sandbox:
        running = row.state in LIVE_STATES and row.started_at is not None
        return cls(
            id=row.id,
            name=row.name,
            state=row.state,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            labels=row.labels,
            owner=row.owner,
            created_at=row.created_at,
            started_at=row.started_at,
            stopped_at=row.stopped_at,
            uptime_s=time.time() - row.started_at if running and row.started_at else None,
            cpu_percent=None if cpu_percent is None else round(cpu_percent, 1),
            pid=row.qemu_pid if row.state in LIVE_STATES else None,
            exit_code=row.exit_code,
            error=row.error,
            idle_paused=idle_paused and row.state is VMState.RUNNING,
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


class TemplateRequest(BaseModel):
    """Save a running sandbox as a template (``POST /v1/sandboxes/{id}/template``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, description="[a-z0-9][a-z0-9_-]*")


class Template(BaseModel):
    """A template, as ``GET /v1/templates`` lists it."""

    name: str
    image: str
    memory_mib: int
    vcpus: int
    created: float
    source: str | None = Field(description="the id of the sandbox it was saved from")
    disk_bytes: int = Field(description="what its RAM and device state take on disk")
    problem: str | None = Field(description="why a clone of it would be refused, if it would")
    automatic: bool = Field(
        default=False,
        description="the automatic boot template of a VM shape (listed with all=true only)",
    )


class ForkRequest(BaseModel):
    """Fork a running sandbox (``POST /v1/sandboxes/{id}/fork``)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=1, ge=1, le=16, description="how many children (1 to 16)")
