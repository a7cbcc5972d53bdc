"""``/v1/events``: the lifecycle events of VMs, in id order."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Query

from warden._errors import VMNotFoundError
from warden.policy.access import target_of
from warden.server.limits import MAX_EVENT_ID, MAX_REF
from warden.server.models import Event
from warden.server.routes import API, GrantDep, ManagerDep

router = APIRouter(prefix=API)


@router.get("/events")
async def events(
    manager: ManagerDep,
    grant: GrantDep,
    after: int = Query(0, ge=0, le=MAX_EVENT_ID, description="return events with a larger id"),
    vm: str | None = Query(
        None, min_length=1, max_length=MAX_REF, description="only this VM's (id or name)"
    ),
    limit: int = Query(1000, ge=1, le=10000),
) -> list[Event]:
    """Lifecycle events in id order. Follow them by polling with the last id seen. A caller
    who may not ``admin`` the daemon sees only the events of the sandboxes it may ``inspect``
    now (none of removed ones)."""
    vm_id = vm
    if vm is not None:
        # A name is resolved while its VM exists; a removed VM's events stay under its id.
        with contextlib.suppress(VMNotFoundError):
            vm_id = (await manager.get(vm)).id
    rows = await asyncio.to_thread(manager.store.events_since, after, vm_id=vm_id, limit=limit)
    if not grant.sees_everything():
        visible = {r.id for r in await manager.list(all=True) if grant.may("inspect", target_of(r))}
        rows = [r for r in rows if r.vm_id in visible]
    return [Event.from_row(r) for r in rows]
