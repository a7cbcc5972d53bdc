"""Who the daemon thinks the caller is: ``GET /v1/whoami``.

Every authenticated caller may ask (it reveals only what the caller is); the principal is the
one the middleware (``server/auth.py``) put into the request's scope.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from warden.auth.principal import principal_of
from warden.server.routes import API

router = APIRouter()


class WhoAmI(BaseModel):
    """The caller's principal: ``name`` owns what it creates; ``roles`` select the policy's
    rules; ``via`` is how it was established (``unix`` peer credentials, a ``token``, or
    ``local``: in-process)."""

    name: str
    roles: list[str]
    via: Literal["unix", "token", "local"]
    uid: int | None = None
    token_id: str | None = None


@router.get(f"{API}/whoami")
async def whoami(request: Request) -> WhoAmI:
    """The principal of this request, as the daemon sees it."""
    p = principal_of(request.scope)
    return WhoAmI(name=p.name, roles=sorted(p.roles), via=p.via, uid=p.uid, token_id=p.token_id)
