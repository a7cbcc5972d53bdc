"""``/v1/sandboxes/{ref}/files``: streamed upload and download, stat, list, remove, mkdir."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from warden.server.limits import MAX_MODE, GuestPath
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
    size = await machine.agent.write_file(path, request.stream(), mode=mode, user=user)
    metrics.bytes.inc(size, direction="files_in")
    return {"path": path, "size": size}


@router.get("/{ref}/files")
async def get_file(
    ref: str, manager: ManagerDep, metrics: MetricsDep, path: PathQuery, user: UserDep
) -> StreamingResponse:
    machine = await manager.machine(ref)
    chunks = cast(AsyncGenerator[bytes, None], machine.agent.read_file(path, user=user))
    # Read the first chunk before answering, so a missing file is a 404, not a cut stream.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                metrics.bytes.inc(len(first), direction="files_out")
                yield first
            async for chunk in chunks:
                metrics.bytes.inc(len(chunk), direction="files_out")
                yield chunk
        finally:
            await chunks.aclose()

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
