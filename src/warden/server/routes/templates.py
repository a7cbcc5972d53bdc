"""``/v1/templates``: list and remove templates; ``POST /v1/sandboxes/{ref}/template`` saves a
running sandbox as one. A sandbox is made from a template with ``template`` in its create."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Response

from warden.server.models import Template, TemplateRequest
from warden.server.routes import API, GrantDep, ManagerDep

router = APIRouter(prefix=API)


@router.get("/templates")
async def list_templates(manager: ManagerDep, all: bool = False) -> list[Template]:
    """The templates; with ``all``, the automatic boot templates of VM shapes too."""
    infos = await asyncio.to_thread(manager.templates.list, automatic=all)
    return [Template(**dataclasses.asdict(info)) for info in infos]


@router.delete("/templates/{name}", status_code=204)
async def remove_template(name: str, manager: ManagerDep) -> Response:
    await manager.remove_template(name)
    return Response(status_code=204)


@router.post("/sandboxes/{ref}/template", status_code=201)
async def save_template(
    ref: str, body: TemplateRequest, manager: ManagerDep, grant: GrantDep
) -> Template:
    """Save the running sandbox ``ref`` as template ``name``; it keeps running (paused while
    its state is saved; refused with 409 while it has commands in flight). The caller is
    recorded as its owner in its meta.json."""
    info = await manager.save_template(ref, body.name, owner=grant.principal.name)
    return Template(**dataclasses.asdict(info))
