"""The typed, validated description of a VM. Validation happens before anything starts.

A frozen dataclass with explicit checks, not a pydantic model: ``warden run`` builds one on
its start-up path, where importing pydantic and building the model's schema cost ~0.2 s
(issue 8, "fast everywhere else"). The daemon's HTTP API validates its requests with its own
pydantic models (``server/models.py``) and then builds a VMSpec from them. The pydantic-style
names (``model_validate``, ``model_dump_json``, ``model_copy``...) are kept so callers did not
change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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
MAX_MEMORY_MIB = 1024 * 1024
MAX_AGENT_TIMEOUT_S = 3600.0

Accel = Literal["auto", "kvm", "tcg"]
MemoryBackend = Literal["ram", "file"]
BootMode = Literal["snapshot", "cold"]
_CHOICES: dict[str, tuple[str, ...]] = {
    "accel": ("auto", "kvm", "tcg"),
    "memory_backend": ("ram", "file"),
    "boot": ("snapshot", "cold"),
}


@dataclass(frozen=True)
class VMSpec:
    """What to boot. Immutable once made; every field is checked when it is made (SpecError
    naming each bad option and what to do)."""

    name: str | None = None
    """unique, [a-z0-9][a-z0-9_.-]*"""
    image: str = "default"
    vcpus: int = 1
    memory_mib: int = 256
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    accel: Accel = "auto"
    memory_backend: MemoryBackend = "ram"
    """'file' backs guest RAM with a shareable file (for clones)"""
    agent_timeout_s: float = 60.0
    boot: BootMode = "snapshot"
    """'snapshot' clones the automatic template of this shape (made by the first such boot);
    'cold' boots"""
    template: str | None = None
    """clone this template: its image, memory and vCPUs are the clone's"""

    model_fields: ClassVar[tuple[str, ...]] = (
        "name",
        "image",
        "vcpus",
        "memory_mib",
        "env",
        "labels",
        "accel",
        "memory_backend",
        "agent_timeout_s",
        "boot",
        "template",
    )

    def __post_init__(self) -> None:
        problems = [
            f"  {name}: {msg} (got {getattr(self, name)!r})"
            for name, check in _CHECKS.items()
            if (msg := check(getattr(self, name))) is not None
        ]
        if problems:
            raise SpecError("\n".join(["invalid VM spec:", *problems]))
        if isinstance(self.agent_timeout_s, int):
            object.__setattr__(self, "agent_timeout_s", float(self.agent_timeout_s))

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    @classmethod
    def parse(cls, *, check_host: bool = True, **fields: object) -> VMSpec:
        """Validate ``fields``; raise SpecError naming each bad option and what to do.

        ``check_host=False`` skips :meth:`check_host`: for a client whose VMs run elsewhere
        (the daemon checks its own host).
        """
        spec = cls.model_validate(fields)
        if check_host:
            spec.check_host()
        return spec

    @classmethod
    def model_validate(cls, fields: Mapping[str, object]) -> VMSpec:
        """A spec from a mapping of its fields; an unknown field is refused by name."""
        unknown = sorted(set(fields) - set(cls.model_fields))
        if unknown:
            known = ", ".join(sorted(cls.model_fields))
            raise SpecError(
                "invalid VM spec:\n"
                + "\n".join(
                    f"  {k}: unknown option; known options are {known} (got {fields[k]!r})"
                    for k in unknown
                )
            )
        return cls(**fields)  # type: ignore[arg-type]

    @classmethod
    def model_validate_json(cls, text: str | bytes) -> VMSpec:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise SpecError(f"invalid VM spec: a JSON object is needed (got {data!r})")
        return cls.model_validate(data)

    def model_dump(self) -> dict[str, Any]:
        return {k: _copy(getattr(self, k)) for k in self.model_fields}

    def model_dump_json(self) -> str:
        return json.dumps(self.model_dump(), separators=(",", ":"))

    def model_copy(self, *, update: Mapping[str, object] | None = None) -> VMSpec:
        """A copy with ``update``'s fields changed (checked again)."""
        return dataclasses.replace(self, **(update or {}))  # type: ignore[arg-type]

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        """The JSON schema of a spec (documentation; the daemon's API has its own models)."""
        string = {"type": "string"}
        str_map = {"type": "object", "additionalProperties": string}
        props: dict[str, Any] = {
            "name": {"anyOf": [string, {"type": "null"}], "default": None},
            "image": {"type": "string", "minLength": 1, "maxLength": 63, "default": "default"},
            "vcpus": {"type": "integer", "minimum": 1, "maximum": MAX_VCPUS, "default": 1},
            "memory_mib": {
                "type": "integer",
                "minimum": MIN_MEMORY_MIB,
                "maximum": MAX_MEMORY_MIB,
                "default": 256,
            },
            "env": str_map,
            "labels": str_map,
            "template": {"anyOf": [string, {"type": "null"}], "default": None},
            "agent_timeout_s": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_AGENT_TIMEOUT_S,
                "default": 60.0,
            },
        }
        for name, choices in _CHOICES.items():
            props[name] = {"enum": list(choices), "default": choices[0]}
        return {
            "title": "VMSpec",
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }

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


def _copy(value: object) -> object:
    return dict(value) if isinstance(value, dict) else value


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_name(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not NAME_RE.match(v):
        return "use 1-63 chars of a-z, 0-9, '_', '.', '-', starting alphanumeric"
    return None


def _check_template(v: object) -> str | None:
    if v is not None and (not isinstance(v, str) or not TEMPLATE_RE.match(v)):
        return "a template name is 1-63 characters of a-z, 0-9, '_' and '-'"
    return None


def _check_image(v: object) -> str | None:
    if not isinstance(v, str) or not NAME_RE.match(v):
        return "an image name is 1-63 characters of a-z, 0-9, '_', '.', '-'"
    return None


def _check_vcpus(v: object) -> str | None:
    if not _is_int(v):
        return "Input should be a valid integer"
    if not 1 <= v <= MAX_VCPUS:  # type: ignore[operator]
        return f"give 1 to {MAX_VCPUS} vcpus"
    return None


def _check_memory(v: object) -> str | None:
    if not _is_int(v):
        return "Input should be a valid integer"
    if v < MIN_MEMORY_MIB:  # type: ignore[operator]
        return (
            f"{v} MiB is below the minimum of {MIN_MEMORY_MIB} MiB that a guest boots in; "
            f"set memory_mib to {MIN_MEMORY_MIB} or more"
        )
    if v > MAX_MEMORY_MIB:  # type: ignore[operator]
        return f"Input should be less than or equal to {MAX_MEMORY_MIB}"
    return None


def _check_str_map(what: str) -> Callable[[object], str | None]:
    def check(v: object) -> str | None:
        if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        ):
            return f"{what} must map strings to strings"
        return None

    return check


def _check_env(v: object) -> str | None:
    problem = _check_str_map("env")(v)
    if problem is not None:
        return problem
    assert isinstance(v, dict)
    for key, value in v.items():
        if not ENV_KEY_RE.match(key):
            return f"environment variable name {key!r} is not valid"
        if "\0" in value:
            return f"environment variable {key!r} contains a NUL byte"
    return None


def _check_choice(name: str) -> Callable[[object], str | None]:
    choices = _CHOICES[name]

    def check(v: object) -> str | None:
        if v not in choices:
            return "Input should be " + " or ".join(repr(c) for c in choices)
        return None

    return check


def _check_timeout(v: object) -> str | None:
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):  # type: ignore[arg-type]
        return "Input should be a valid number"
    if not 0 < v <= MAX_AGENT_TIMEOUT_S:  # type: ignore[operator]
        return f"give more than 0 and at most {MAX_AGENT_TIMEOUT_S:g} seconds"
    return None


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "name": _check_name,
    "image": _check_image,
    "vcpus": _check_vcpus,
    "memory_mib": _check_memory,
    "env": _check_env,
    "labels": _check_str_map("labels"),
    "accel": _check_choice("accel"),
    "memory_backend": _check_choice("memory_backend"),
    "agent_timeout_s": _check_timeout,
    "boot": _check_choice("boot"),
    "template": _check_template,
}
