"""The REST API of the manager (FastAPI). ``create_app(manager)`` builds it.

Errors are JSON ``{"detail": message}``: 404 for an unknown id or name, 409 for a name clash,
an admission refusal or a VM in the wrong state, 422 for a bad body (unknown fields included).
Command output and file contents are streamed, never buffered whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from warden._errors import (
    AdmissionError,
    CommandTimeoutError,
    GuestFileError,
    NameConflictError,
    SpecError,
    StateTransitionError,
    VMError,
    VMNotFoundError,
    WardenError,
)
from warden.agent.client import ExecResult
from warden.server.manager import Manager
from warden.store.db import VMRow
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

API = "/v1"


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    image: str = "default"
    memory_mib: int = 256
    vcpus: int = 1
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: list[str] | str = Field(min_length=1)
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(default=None, description="base64 of the whole stdin")
    timeout: float | None = Field(default=None, gt=0)


class Sandbox(BaseModel):
    id: str
    name: str | None
    state: VMState
    image: str
    vcpus: int
    memory_mib: int
    labels: dict[str, str]
    created_at: float
    started_at: float | None
    stopped_at: float | None
    uptime_s: float | None
    pid: int | None
    exit_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: VMRow) -> Sandbox:
        running = row.state is VMState.RUNNING and row.started_at is not None
        return cls(
            id=row.id,
            name=row.name,
            state=row.state,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            labels=row.labels,
            created_at=row.created_at,
            started_at=row.started_at,
            stopped_at=row.stopped_at,
            uptime_s=time.time() - row.started_at if running and row.started_at else None,
            pid=row.qemu_pid if row.state is VMState.RUNNING else None,
            exit_code=row.exit_code,
            error=row.error,
        )


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status)


def create_app(manager: Manager, *, manage_lifespan: bool = True) -> FastAPI:
    """The API over ``manager``. With ``manage_lifespan``, the app starts the manager (which
    reattaches to live VMs) and closes it on shutdown (leaving VMs running)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifespan:
            await manager.start()
        try:
            yield
        finally:
            if manage_lifespan:
                await manager.close()

    app = FastAPI(title="warden", version="1", lifespan=lifespan)

    @app.exception_handler(VMNotFoundError)
    async def _not_found(request: Request, exc: VMNotFoundError) -> JSONResponse:
        return _error(404, exc)

    @app.exception_handler(NameConflictError)
    async def _conflict(request: Request, exc: NameConflictError) -> JSONResponse:
        return _error(409, exc)

    @app.exception_handler(StateTransitionError)
    async def _state(request: Request, exc: StateTransitionError) -> JSONResponse:
        return _error(409, exc)

    @app.exception_handler(AdmissionError)
    async def _admission(request: Request, exc: AdmissionError) -> JSONResponse:
        return _error(409, exc)

    @app.exception_handler(SpecError)
    async def _spec(request: Request, exc: SpecError) -> JSONResponse:
        return _error(422, exc)

    @app.exception_handler(GuestFileError)
    async def _guest_file(request: Request, exc: GuestFileError) -> JSONResponse:
        return _error(404 if exc.errno == errno.ENOENT else 400, exc)

    @app.exception_handler(VMError)
    async def _vm(request: Request, exc: VMError) -> JSONResponse:
        return _error(500, exc)

    @app.exception_handler(WardenError)
    async def _warden(request: Request, exc: WardenError) -> JSONResponse:
        return _error(500, exc)

    @app.post(f"{API}/sandboxes", status_code=201)
    async def create(body: CreateRequest) -> Sandbox:
        spec = VMSpec.parse(**body.model_dump())
        return Sandbox.from_row(await manager.create(spec))

    @app.get(f"{API}/sandboxes")
    async def list_sandboxes(all: bool = False) -> list[Sandbox]:
        return [Sandbox.from_row(r) for r in await manager.list(all=all)]

    @app.get(f"{API}/sandboxes/{{ref}}")
    async def inspect(ref: str) -> Sandbox:
        return Sandbox.from_row(await manager.get(ref))

    @app.post(f"{API}/sandboxes/{{ref}}/stop")
    async def stop(ref: str) -> Sandbox:
        return Sandbox.from_row(await manager.stop(ref))

    @app.delete(f"{API}/sandboxes/{{ref}}", status_code=204)
    async def remove(ref: str, force: bool = False) -> Response:
        await manager.remove(ref, force=force)
        return Response(status_code=204)

    @app.get(f"{API}/sandboxes/{{ref}}/logs", response_class=PlainTextResponse)
    async def logs(ref: str, lines: int = Query(100, ge=1, le=10000)) -> str:
        return await manager.console(ref, lines)

    @app.get(f"{API}/info")
    async def info() -> dict[str, Any]:
        return await manager.info()

    @app.post(f"{API}/sandboxes/{{ref}}/exec")
    async def exec_(ref: str, body: ExecRequest) -> StreamingResponse:
        machine = await manager.machine(ref)
        agent = machine.agent
        stdin: bytes | None = None
        if body.stdin is not None:
            try:
                stdin = base64.b64decode(body.stdin, validate=True)
            except binascii.Error as exc:
                raise SpecError(f"stdin is not valid base64: {exc}") from None
        return StreamingResponse(
            _exec_stream(agent.exec, body, stdin), media_type="application/x-ndjson"
        )

    @app.put(f"{API}/sandboxes/{{ref}}/files")
    async def put_file(
        ref: str, request: Request, path: str = Query(min_length=1), mode: int = 0o644
    ) -> dict[str, Any]:
        machine = await manager.machine(ref)
        size = await machine.agent.write_file(path, request.stream(), mode=mode)
        return {"path": path, "size": size}

    @app.get(f"{API}/sandboxes/{{ref}}/files")
    async def get_file(ref: str, path: str = Query(min_length=1)) -> StreamingResponse:
        machine = await manager.machine(ref)
        chunks = cast(AsyncGenerator[bytes, None], machine.agent.read_file(path))
        # Read the first chunk before answering, so a missing file is a 404, not a cut stream.
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/octet-stream")

    return app


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _exec_stream(
    exec_fn: Any, body: ExecRequest, stdin: bytes | None
) -> AsyncIterator[bytes]:
    """Run the command; yield NDJSON lines of its output as it comes, then its result."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def out(chunk: bytes) -> None:
        queue.put_nowait(_line({"stdout": base64.b64encode(chunk).decode()}))

    def err(chunk: bytes) -> None:
        queue.put_nowait(_line({"stderr": base64.b64encode(chunk).decode()}))

    async def run() -> None:
        try:
            result: ExecResult = await exec_fn(
                body.cmd,
                env=body.env,
                cwd=body.cwd,
                stdin=stdin,
                timeout=body.timeout,
                on_stdout=out,
                on_stderr=err,
            )
            final: dict[str, Any] = {
                "exit_code": result.exit_code,
                "signal": result.signal,
                "timed_out": result.timed_out,
            }
        except CommandTimeoutError as exc:
            partial = exc.result
            final = {
                "exit_code": getattr(partial, "exit_code", None),
                "signal": getattr(partial, "signal", None),
                "timed_out": True,
            }
        except WardenError as exc:
            final = {"error": str(exc)}
        queue.put_nowait(_line(final))
        queue.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            yield item
    finally:
        if not task.done():
            task.cancel()  # the client went away: cancelling kills the command
        with contextlib.suppress(BaseException):
            await task
