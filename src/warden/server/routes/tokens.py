"""``/v1/tokens``: make, list and revoke API tokens through the daemon (an ``admin`` action).

``warden token`` uses these when the daemon answers, so that each change is recorded in the
audit log by its one writer (the daemon); with no daemon it changes the store itself and
records the change in the log. A token's text is in the create's answer only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from warden.auth.tokens import TokenInfo, TokenStore, parse_expiry
from warden.server.routes import API, ManagerDep

router = APIRouter(prefix=f"{API}/tokens")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="the principal")
    roles: list[str] = Field(default_factory=lambda: ["user"], min_length=1, max_length=16)
    expires: str | None = Field(
        default=None, max_length=32, description="30d, 12h, 90m, 2w, or a date 2026-12-31 (UTC)"
    )


def token_json(info: TokenInfo, now: float | None = None) -> dict[str, Any]:
    """A token as the API and ``warden token list --json`` show it: never its secret."""
    row = dataclasses.asdict(info)
    row["roles"] = sorted(info.roles)
    row["state"] = info.state(now)
    return row


def audit_fields(info: TokenInfo) -> dict[str, str | float | None]:
    """What the audit log keeps of a token change (never its text)."""
    return {
        "token_id": info.id,
        "token_name": info.name,
        "roles": ",".join(sorted(info.roles)),
        "expires": info.expires,
    }


@router.post("", status_code=201)
async def create_token(body: TokenRequest, manager: ManagerDep) -> dict[str, Any]:
    """A new token; its ``text`` is in this answer only."""

    def make() -> tuple[TokenInfo, str]:
        when = parse_expiry(body.expires) if body.expires is not None else None
        with TokenStore.open(manager.paths) as store:
            new = store.create(body.name, body.roles, when, source="api")
        return new.info, new.text

    info, text = await asyncio.to_thread(make)
    await manager.audit.record("token-create", fields=audit_fields(info))
    return {**token_json(info), "text": text}


@router.get("")
async def list_tokens(manager: ManagerDep) -> list[dict[str, Any]]:
    def read() -> list[TokenInfo]:
        with TokenStore.open(manager.paths) as store:
            return store.all()

    now = time.time()
    return [token_json(t, now) for t in await asyncio.to_thread(read)]


@router.delete("/{which}")
async def revoke_token(which: str, manager: ManagerDep) -> list[dict[str, Any]]:
    """Revoke token ``which`` (an id), or every active token of principal ``which``; the
    tokens revoked now. Their next request gets 401."""

    def revoke() -> list[TokenInfo]:
        with TokenStore.open(manager.paths) as store:
            return store.revoke(which)

    revoked = await asyncio.to_thread(revoke)
    for info in revoked:
        await manager.audit.record("token-revoke", fields=audit_fields(info))
    return [token_json(t) for t in revoked]
