"""``/v1/links``: VM-to-VM links (``warden.links``): create, list, remove.

Each route acts on two sandboxes: it needs the ``link`` action of the access policy on *both*
sandboxes of the link (``server/access.py``: kind ``link``, checked here with
``Grant.require_sandbox``; a listing shows the links whose two ends the caller may link).
Every create and remove is audited (``link-create``, ``link-rm``) by the manager's
LinkManager, and every denial by the access control.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from warden.links import LinkInfo
from warden.policy.access import target_of
from warden.server.routes import API, GrantDep, ManagerDep

router = APIRouter(prefix=f"{API}/links")


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str = Field(min_length=1, max_length=128, description="a running sandbox (id or name)")
    b: str = Field(min_length=1, max_length=128, description="another running sandbox")
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="the link's name: its socket is /run/warden/links/NAME.sock in both",
    )
    transport: Literal["ring", "relay"] = Field(
        default="ring",
        description="ring: shared memory between the two VMs; relay: through the daemon",
    )


class Link(BaseModel):
    name: str
    a: str
    b: str
    created: float
    relayed_ab: int
    relayed_ba: int
    path: str


def _link(info: LinkInfo) -> Link:
    return Link(**dataclasses.asdict(info))


@router.post("", status_code=201)
async def create_link(body: LinkRequest, manager: ManagerDep, grant: GrantDep) -> Link:
    """Link running sandboxes ``a`` and ``b`` as ``name`` (needs ``link`` on both): each gets
    ``/run/warden/links/NAME.sock``. 404 if either is missing, 409 if either is not running,
    they are the same, the name is taken or an end could not be opened (nothing left open)."""
    row_a = await grant.require_sandbox(manager, body.a)
    row_b = await grant.require_sandbox(manager, body.b)
    info = await manager.links.create(row_a.id, row_b.id, body.name, transport=body.transport)
    return _link(info)


@router.get("")
async def list_links(manager: ManagerDep, grant: GrantDep) -> list[Link]:
    """The open links whose two sandboxes the caller may ``link``."""
    infos = manager.links.list()
    if grant.sees_everything():
        return [_link(info) for info in infos]
    rows = {r.id: r for r in await manager.list(all=True)}
    return [
        _link(info)
        for info in infos
        if all(r in rows and grant.may("link", target_of(rows[r])) for r in (info.a, info.b))
    ]


@router.delete("/{name}")
async def remove_link(name: str, manager: ManagerDep, grant: GrantDep) -> dict[str, Any]:
    """Close both ends of link ``name`` (needs ``link`` on both sandboxes): each client sees
    its connection end with an error. The answer says how long until both agents confirmed
    (``closed_ms``). 404 if no link has that name."""
    if name in {i.name for i in manager.links.list()}:
        ends = manager.links.get(name)
        for ref in (ends.a, ends.b):
            await grant.require_sandbox(manager, ref)
    info, took = await manager.links.remove(name)  # LinkNotFoundError, audited, if none
    return {"name": info.name, "a": info.a, "b": info.b, "closed_ms": round(took * 1000, 1)}
