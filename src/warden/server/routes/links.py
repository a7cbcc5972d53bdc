"""``/v1/links``: VM-to-VM links (``warden.links``): create, list, remove.

Each route acts on two sandboxes: the access policy (``policy/access.py``) maps them to the
``link`` action, which the caller needs on *both* sandboxes of the link. Every create and
remove is audited (``link-create``, ``link-rm``) by the manager's LinkManager.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from warden.links import LinkInfo
from warden.server.routes import API, ManagerDep

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
async def create_link(body: LinkRequest, manager: ManagerDep) -> Link:
    """Link running sandboxes ``a`` and ``b`` as ``name`` (needs ``link`` on both): each gets
    ``/run/warden/links/NAME.sock``. 404 if either is missing, 409 if either is not running,
    they are the same, the name is taken or an end could not be opened (nothing left open)."""
    return _link(await manager.links.create(body.a, body.b, body.name))


@router.get("")
async def list_links(manager: ManagerDep) -> list[Link]:
    """The open links (needs ``link`` on both sandboxes of each)."""
    return [_link(info) for info in manager.links.list()]


@router.delete("/{name}")
async def remove_link(name: str, manager: ManagerDep) -> dict[str, Any]:
    """Close both ends of link ``name`` (needs ``link`` on both sandboxes): each client sees
    its connection end with an error. The answer says how long until both agents confirmed
    (``closed_ms``). 404 if no link has that name."""
    info, took = await manager.links.remove(name)
    return {"name": info.name, "a": info.a, "b": info.b, "closed_ms": round(took * 1000, 1)}
