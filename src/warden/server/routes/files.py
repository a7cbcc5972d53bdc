"""``/v1/sandboxes/{ref}/files``: streamed upload and download, stat, list, remove, mkdir."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from warden._errors import WardenError
from warden.server.limits import MAX_MODE, GuestPath
from warden.server.manager import Manager
from warden.server.models import Entry
from warden.server.routes import API, ManagerDep, MetricsDep, UserDep

router = APIRouter(prefix=f"{API}/sandboxes")

PathQuery = Annotated[GuestPath, Query(description="an absolute path in the guest")]


@router.put("/{ref}/files")
async def put_file(
    ref: str,
    request: Request,
    manager: ManagerDep,
    metrics: MetricsDep,
    path: PathQuery,
    user: UserDep,
    mode: int = Query(0o644, ge=0, le=MAX_MODE, description="permission bits, e.g. 420 (0o644)"),
) -> dict[str, Any]:
    machine = await manager.machine(ref)
    audit = _Transfer(manager, "files-write", machine.id, path, user)

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield audit.hashed(chunk)

    try:
        size = await machine.agent.write_file(path, chunks(), mode=mode, user=user)
    except (WardenError, asyncio.CancelledError) as exc:
        await audit.failed(exc)
        raise
    metrics.bytes.inc(size, direction="files_in")
    await audit.recorded()
    return {"path": path, "size": size}


class _Transfer:
    """The audit record of one file transfer: the bytes it moved, hashed as they pass."""

    def __init__(self, manager: Manager, action: str, vm_id: str, path: str, user: str) -> None:
        self.manager, self.action, self.vm_id, self.path, self.user = (
            manager, action, vm_id, path, user
        )  # fmt: skip
        self.digest = hashlib.sha256()
        self.size = 0

    def hashed(self, chunk: bytes) -> bytes:
        """``chunk``, counted and hashed."""
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk

    async def recorded(self) -> None:
        """Record the transfer done: its size and SHA-256."""
        await self.manager.audit.record(
            self.action,
            sandbox=self.vm_id,
            path=self.path,
            user=self.user,
            size=self.size,
            sha256=self.digest.hexdigest(),
            direction="in" if self.action == "files-write" else "out",
        )

    async def failed(self, error: BaseException) -> None:
        """Record the transfer failed (or its client gone), even while being cancelled."""
        record = self.manager.audit.record(
            self.action,
            sandbox=self.vm_id,
            outcome="error",
            path=self.path,
            user=self.user,
            error=type(error).__name__,
        )
        await asyncio.shield(record)


@router.get("/{ref}/files")
async def get_file(
    ref: str, manager: ManagerDep, metrics: MetricsDep, path: PathQuery, user: UserDep
) -> StreamingResponse:
    machine = await manager.machine(ref)
    audit = _Transfer(manager, "files-read", machine.id, path, user)
    chunks = cast(AsyncGenerator[bytes, None], machine.agent.read_file(path, user=user))
    # Read the first chunk before answering, so a missing file is a 404, not a cut stream.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except (WardenError, asyncio.CancelledError) as exc:
        await audit.failed(exc)
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                metrics.bytes.inc(len(first), direction="files_out")
                yield audit.hashed(first)
            async for chunk in chunks:
                metrics.bytes.inc(len(chunk), direction="files_out")
                yield audit.hashed(chunk)
        except (WardenError, asyncio.CancelledError, GeneratorExit) as exc:
            await audit.failed(exc)
            raise
        finally:
            await chunks.aclose()
        # Recorded before the body's end goes out: an answered read is a recorded one.
        await audit.recorded()

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.get("/{ref}/files/stat")
async def stat_file(ref: str, manager: ManagerDep, path: PathQuery, user: UserDep) -> Entry:
    machine = await manager.machine(ref)
    return Entry.from_info(await machine.agent.stat(path, user=user))


@router.get("/{ref}/files/list")
async def list_files(ref: str, manager: ManagerDep, path: PathQuery, user: UserDep) -> list[Entry]:
    machine = await manager.machine(ref)
    return [Entry.from_info(e) for e in await machine.agent.list_dir(path, user=user)]


@router.delete("/{ref}/files", status_code=204)
async def remove_file(
    ref: str, manager: ManagerDep, path: PathQuery, user: UserDep, recursive: bool = False
) -> Response:
    machine = await manager.machine(ref)
    await machine.agent.remove(path, recursive=recursive, user=user)
    return Response(status_code=204)


@router.post("/{ref}/files/mkdir")
async def make_dir(
    ref: str,
    manager: ManagerDep,
    path: PathQuery,
    user: UserDep,
    parents: bool = True,
    mode: int = Query(0o755, ge=0, le=MAX_MODE),
) -> Entry:
    machine = await manager.machine(ref)
    await machine.agent.make_dir(path, parents=parents, mode=mode, user=user)
    return Entry.from_info(await machine.agent.stat(path, user=user))
