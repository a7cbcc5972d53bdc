"""The typed, validated description of a VM. Validation happens before anything starts."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from warden._errors import SpecError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TEMPLATE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

MIN_MEMORY_MIB = 128
"""The least guest memory warden boots, in MiB. Measured with the default image (cold boot under
TCG, then an exec of python3): 64 MiB panics the guest kernel at boot, 80 MiB boots but the agent
stops answering (the guest thrashes), 88 MiB serves exec with 12 MiB available and 96 MiB with
about 20 MiB. 128 MiB leaves a margin of 40 MiB over the least that worked (about 55 MiB
available) for the workload, its tmpfs files and a larger image."""
MAX_VCPUS = 64

Accel = Literal["auto", "kvm", "tcg"]
MemoryBackend = Literal["ram", "file"]
BootMode = Literal["snapshot", "cold"]


class VMSpec(BaseModel):
    """What to boot. Immutable once made; ``VMSpec.parse`` turns errors into SpecError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, description="unique, [a-z0-9][a-z0-9_.-]*")
    image: str = Field(default="default", min_length=1, max_length=64)
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(
        default=256, le=1024 * 1024, json_schema_extra={"minimum": MIN_MEMORY_MIB}
    )
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    accel: Accel = "auto"
    memory_backend: MemoryBackend = Field(
        default="ram", description="'file' backs guest RAM with a shareable file (for clones)"
    )
    agent_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    boot: BootMode = Field(
        default="snapshot",
        description="'snapshot' restores a saved just-booted state when one exists; 'cold' boots",
    )

    template: str | None = Field(
        default=None,
        description="clone this template: its image, memory and vCPUs are the clone's",
    )

    @field_validator("template")
    @classmethod
    def _check_template(cls, v: str | None) -> str | None:
        if v is not None and not TEMPLATE_RE.match(v):
            raise ValueError("a template name is 1-63 characters of a-z, 0-9, '_' and '-'")
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("use 1-63 chars of a-z, 0-9, '_', '.', '-', starting alphanumeric")
        return v

    @field_validator("memory_mib")
    @classmethod
    def _check_memory(cls, v: int) -> int:
        if v < MIN_MEMORY_MIB:
            raise ValueError(
                f"{v} MiB is below the minimum of {MIN_MEMORY_MIB} MiB that a guest boots in; "
                f"set memory_mib to {MIN_MEMORY_MIB} or more"
            )
        return v

    @field_validator("image")
    @classmethod
    def _check_image(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("an image name is 1-63 characters of a-z, 0-9, '_', '.', '-'")
        return v

    @field_validator("env")
    @classmethod
    def _check_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\0" in value:
                raise ValueError(f"environment variable {key!r} contains a NUL byte")
        return v

    @classmethod
    def parse(cls, *, check_host: bool = True, **fields: object) -> VMSpec:
        """Validate ``fields``; raise SpecError naming each bad option and what to do.

        ``check_host=False`` skips :meth:`check_host`: for a client whose VMs run elsewhere
        (the daemon checks its own host).
        """
        try:
            spec = cls.model_validate(fields)
        except ValidationError as exc:
            raise SpecError(_explain(exc)) from None
        if check_host:
            spec.check_host()
        return spec

    def check_host(self) -> None:
        """Refuse what this host can never run."""
        cpus = os.cpu_count() or 1
        if self.vcpus > cpus * 4:
            raise SpecError(
                f"vcpus={self.vcpus} is more than 4x this host's {cpus} CPUs; "
                f"set vcpus to at most {cpus * 4}"
            )
        total = _host_memory_mib()
        if total is not None and self.memory_mib > total:
            raise SpecError(
                f"memory_mib={self.memory_mib} is more than this host's {total} MiB; "
                "set memory_mib lower"
            )


def _host_memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _explain(exc: ValidationError) -> str:
    lines = ["invalid VM spec:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown option; known options are {', '.join(sorted(VMSpec.model_fields))}"
        lines.append(f"  {field}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)
