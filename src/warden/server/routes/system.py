"""The daemon itself: ``/v1/info`` (capacity, limits, reservations), ``/metrics`` and
``/v1/policy/reload``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from warden._errors import PolicyError
from warden.server.access import control_of
from warden.server.metrics import CONTENT_TYPE, gauge
from warden.server.routes import API, ManagerDep, MetricsDep
from warden.vmm.state import VMState

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(manager: ManagerDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    rows = await manager.list(all=True)
    by_state: dict[tuple[tuple[str, str], ...], float] = {
        (("state", s.value),): 0.0 for s in VMState
    }
    for row in rows:
        by_state[(("state", row.state.value),)] += 1
    info = await manager.info()
    reservations = cast(dict[str, int], info["reservations"])
    limits = cast(dict[str, int], info["limits"])
    text = metrics.render(
        gauges=[
            gauge("warden_vms", "VMs in the store, by state.", by_state),
            gauge("warden_vms_held", "VMs this daemon holds.", {(): float(len(manager.vms))}),
            gauge(
                "warden_reserved",
                "What active VMs reserve: guest memory_mib, charged_memory_mib (with "
                "QEMU overhead) and vcpus.",
                {
                    (("resource", k),): float(reservations[k])
                    for k in ("memory_mib", "charged_memory_mib", "vcpus")
                },
            ),
            gauge(
                "warden_limit",
                "Admission limits: memory_mib and vcpus.",
                {(("resource", k),): float(v) for k, v in limits.items()},
            ),
        ]
    )
    return Response(text, media_type=CONTENT_TYPE)


@router.get(f"{API}/info")
async def info(manager: ManagerDep) -> dict[str, Any]:
    return await manager.info()


@router.post(f"{API}/policy/reload")
async def reload_policy(request: Request, manager: ManagerDep) -> dict[str, str | int]:
    """Read ``$WARDEN_HOME/policy.toml`` again (the shipped default if it is gone). A bad file
    is refused (409, saying which line or key) and the policy in force stays. Either way the
    reload is in the audit log."""
    try:
        policy = await asyncio.to_thread(control_of(request).reload)
    except PolicyError as exc:
        await manager.audit.record("policy-reload", outcome="error", error=str(exc)[:500])
        raise
    rules, guest = len(policy.rules), len(policy.guest)
    await manager.audit.record(
        "policy-reload", source=policy.source, rules=rules, guest_rules=guest
    )
    return {"source": policy.source, "rules": rules, "guest_rules": guest}
