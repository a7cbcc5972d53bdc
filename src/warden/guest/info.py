"""``info``: the guest's kernel, uptime and memory."""

from __future__ import annotations

import os

AGENT_VERSION = "0.2.0"
AGENT_NAME = f"warden-agent/{AGENT_VERSION}"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _read_meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def op_info(_args: dict[str, Any]) -> dict[str, Any]:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            uptime: float | None = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = None
    mem = _read_meminfo()
    return {
        "kernel": os.uname().release,
        "uptime_s": uptime,
        "mem_total_kib": mem.get("MemTotal"),
        "mem_available_kib": mem.get("MemAvailable"),
        "agent_version": AGENT_VERSION,
        "pid": os.getpid(),
    }
