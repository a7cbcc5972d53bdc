"""``/v1/sandboxes``: create, list, inspect, pause, resume, stop, remove; a VM's console log,
guest info and a ping of its agent."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse

from warden._errors import AdmissionError, JailUnavailableError, NameConflictError
from warden.policy.access import Target, target_of
from warden.server.manager import Manager
from warden.server.models import CreateRequest, ForkRequest, Sandbox
from warden.server.routes import API, GrantDep, ManagerDep, MetricsDep
from warden.store.db import VMRow
from warden.vmm.spec import VMSpec

router = APIRouter(prefix=f"{API}/sandboxes")


@router.post("", status_code=201)
async def create(
    body: CreateRequest, manager: ManagerDep, metrics: MetricsDep, grant: GrantDep
) -> Sandbox:
    """Create a sandbox owned by the caller (the policy's ``create`` on a sandbox of that
    owner, labels and template)."""
    owner = grant.principal.name
    await grant.require("create", Target(owner=owner, labels=body.labels, template=body.template))
    spec = VMSpec.parse(**body.model_dump(exclude={"require_jail"}))
    started = time.monotonic()
    outcome = "error"
    try:
        row = await manager.create(spec, require_jail=body.require_jail, owner=owner)
        outcome = "ok"
    except (AdmissionError, NameConflictError, JailUnavailableError):
        outcome = "refused"
        raise
    finally:
        metrics.create_seconds.observe(time.monotonic() - started, outcome=outcome)
    return Sandbox.from_row(row)


@router.post("/{ref}/fork", status_code=201)
async def fork(ref: str, body: ForkRequest, manager: ManagerDep, grant: GrantDep) -> list[Sandbox]:
    """Start ``n`` children of the running sandbox ``ref`` that carry on from its state (files
    and processes) and share its memory copy-on-write; it keeps running (paused while its
    memory is copied; refused with 409 while it has commands in flight). Each child is
    admitted like a create, and owned by the caller."""
    children = await manager.fork(ref, body.n, owner=grant.principal.name)
    return [Sandbox.from_row(row) for row in children]


def _sandbox(manager: Manager, row: VMRow) -> Sandbox:
    return Sandbox.from_row(row, manager.cpu_percent(row), idle_paused=manager.idle_paused(row.id))


@router.get("")
async def list_sandboxes(manager: ManagerDep, grant: GrantDep, all: bool = False) -> list[Sandbox]:
    """The sandboxes the caller may ``inspect``: a listing shows nothing else."""
    rows = await manager.list(all=all)
    return [_sandbox(manager, r) for r in rows if grant.may("inspect", target_of(r))]


@router.get("/{ref}")
async def inspect(ref: str, manager: ManagerDep) -> Sandbox:
    return _sandbox(manager, await manager.get(ref))


@router.post("/{ref}/pause")
async def pause(ref: str, manager: ManagerDep) -> Sandbox:
    """Save the VM's memory and devices to a sealed file on disk and end its QEMU (its RAM
    is freed); 409 unless it is running with no request in flight."""
    return Sandbox.from_row(await manager.pause(ref))


@router.post("/{ref}/resume")
async def resume(ref: str, manager: ManagerDep) -> Sandbox:
    """Start a paused VM again from its saved state, checked against its seal; 409 unless it
    is paused, or if its saved state is refused."""
    return _sandbox(manager, await manager.resume(ref))


@router.post("/{ref}/stop")
async def stop(ref: str, manager: ManagerDep) -> Sandbox:
    return Sandbox.from_row(await manager.stop(ref))


@router.delete("/{ref}", status_code=204)
async def remove(ref: str, manager: ManagerDep, force: bool = False) -> Response:
    await manager.remove(ref, force=force)
    return Response(status_code=204)


@router.get("/{ref}/logs", response_class=PlainTextResponse)
async def logs(ref: str, manager: ManagerDep, lines: int = Query(100, ge=1, le=10000)) -> str:
    return await manager.console(ref, lines)


@router.get("/{ref}/guest")
async def guest_info(ref: str, manager: ManagerDep) -> dict[str, Any]:
    """Kernel, uptime and memory, as the guest's agent sees them."""
    machine = await manager.machine(ref)
    return await machine.agent.info()


@router.post("/{ref}/ping")
async def ping(ref: str, manager: ManagerDep) -> dict[str, float]:
    """A no-op round trip to the guest's agent; ``agent_rtt_s`` is the daemon's part."""
    machine = await manager.machine(ref)
    return {"agent_rtt_s": await machine.agent.ping()}
