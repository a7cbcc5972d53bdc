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

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import ClientDisconnect

from warden._errors import (
    AdmissionError,
    CommandTimeoutError,
    GuestFileError,
    ImageNotFoundError,
    NameConflictError,
    SpecError,
    StateTransitionError,
    VMNotFoundError,
    WardenError,
)
from warden.agent.client import EntryInfo, ExecResult
from warden.server.lines import Lines, LineStream
from warden.server.manager import Manager
from warden.server.metrics import CONTENT_TYPE, Metrics, gauge
from warden.server.stdin import StdinPipe
from warden.store.db import EventRow, VMRow
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
    stdin_stream: bool = Field(
        default=False,
        description="stdin comes as the body of PUT .../execs/{exec_id}/stdin; the exec_id is "
        "the first line of the output stream",
    )
    timeout: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_stdin(self) -> ExecRequest:
        if self.stdin is not None and self.stdin_stream:
            raise ValueError("give stdin or stdin_stream, not both")
        return self


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
    cpu_percent: float | None = Field(
        description="CPU use of the VM's QEMU over the last second, in percent of one CPU"
    )
    pid: int | None
    exit_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: VMRow, cpu_percent: float | None = None) -> Sandbox:
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
            cpu_percent=None if cpu_percent is None else round(cpu_percent, 1),
            pid=row.qemu_pid if row.state is VMState.RUNNING else None,
            exit_code=row.exit_code,
            error=row.error,
        )


class Entry(BaseModel):
    """A file system entry in the guest (``lstat``: symlinks are not followed)."""

    name: str
    path: str
    type: str = Field(description='"file", "dir", "symlink" or "other"')
    size: int
    mode: int = Field(description="permission bits, e.g. 420 (0o644)")
    mtime: float

    @classmethod
    def from_info(cls, info: EntryInfo) -> Entry:
        return cls(
            name=info.name,
            path=info.path,
            type=info.type,
            size=info.size,
            mode=info.mode,
            mtime=info.mtime,
        )


class Event(BaseModel):
    """A lifecycle event of a VM: ``created``, a state (``running``, ``stopping``,
    ``stopped``, ``failed``) or ``removed``. Ids grow in commit order."""

    id: int
    vm_id: str
    at: float
    kind: str
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: EventRow) -> Event:
        return cls(id=row.id, vm_id=row.vm_id, at=row.at, kind=row.kind, detail=row.detail)


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status)


_STATUS: tuple[tuple[type[WardenError], int], ...] = (
    (VMNotFoundError, 404),
    (ImageNotFoundError, 404),
    (NameConflictError, 409),
    (StateTransitionError, 409),
    (AdmissionError, 409),
    (SpecError, 422),
)
"""The HTTP status of each error the API expects; any other WardenError is a 500."""


def _status(exc: WardenError) -> int:
    if isinstance(exc, GuestFileError):
        return 404 if exc.errno == errno.ENOENT else 400
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


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
    metrics = Metrics()
    app.state.metrics = metrics

    @app.exception_handler(WardenError)
    async def _warden_error(request: Request, exc: WardenError) -> JSONResponse:
        if isinstance(exc, AdmissionError):
            metrics.refused(str(exc))
        return _error(_status(exc), exc)

    @app.post(f"{API}/sandboxes", status_code=201)
    async def create(body: CreateRequest) -> Sandbox:
        spec = VMSpec.parse(**body.model_dump())
        started = time.monotonic()
        outcome = "error"
        try:
            row = await manager.create(spec)
            outcome = "ok"
        except (AdmissionError, NameConflictError):
            outcome = "refused"
            raise
        finally:
            metrics.create_seconds.observe(time.monotonic() - started, outcome=outcome)
        return Sandbox.from_row(row)

    @app.get(f"{API}/sandboxes")
    async def list_sandboxes(all: bool = False) -> list[Sandbox]:
        return [Sandbox.from_row(r, manager.cpu_percent(r)) for r in await manager.list(all=all)]

    @app.get(f"{API}/sandboxes/{{ref}}")
    async def inspect(ref: str) -> Sandbox:
        row = await manager.get(ref)
        return Sandbox.from_row(row, manager.cpu_percent(row))

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

    @app.get(f"{API}/events")
    async def events(
        after: int = Query(0, ge=0, description="return events with a larger id"),
        vm: str | None = Query(None, min_length=1, description="only this VM's (id or name)"),
        limit: int = Query(1000, ge=1, le=10000),
    ) -> list[Event]:
        """Lifecycle events in id order. Follow them by polling with the last id seen."""
        vm_id = vm
        if vm is not None:
            # A name is resolved while its VM exists; a removed VM's events stay under its id.
            with contextlib.suppress(VMNotFoundError):
                vm_id = (await manager.get(vm)).id
        rows = await asyncio.to_thread(manager.store.events_since, after, vm_id=vm_id, limit=limit)
        return [Event.from_row(r) for r in rows]

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus metrics in the text exposition format."""
        rows = await manager.list(all=True)
        by_state: dict[tuple[tuple[str, str], ...], float] = {
            (("state", s.value),): 0.0 for s in VMState
        }
        for row in rows:
            by_state[(("state", row.state.value),)] += 1
        info = await manager.info()
        reservations = cast(dict[str, int], info["reservations"])
        limits = cast(dict[str, int], info["limits"])
        text = metrics.render(
            gauges=[
                gauge("warden_vms", "VMs in the store, by state.", by_state),
                gauge("warden_vms_held", "VMs this daemon holds.", {(): float(len(manager.vms))}),
                gauge(
                    "warden_reserved",
                    "What active VMs reserve: guest memory_mib, charged_memory_mib (with "
                    "QEMU overhead) and vcpus.",
                    {
                        (("resource", k),): float(reservations[k])
                        for k in ("memory_mib", "charged_memory_mib", "vcpus")
                    },
                ),
                gauge(
                    "warden_limit",
                    "Admission limits: memory_mib and vcpus.",
                    {(("resource", k),): float(v) for k, v in limits.items()},
                ),
            ]
        )
        return Response(text, media_type=CONTENT_TYPE)

    @app.get(f"{API}/info")
    async def info() -> dict[str, Any]:
        return await manager.info()

    @app.get(f"{API}/sandboxes/{{ref}}/guest")
    async def guest_info(ref: str) -> dict[str, Any]:
        """Kernel, uptime and memory, as the guest's agent sees them."""
        machine = await manager.machine(ref)
        return await machine.agent.info()

    @app.post(f"{API}/sandboxes/{{ref}}/ping")
    async def ping(ref: str) -> dict[str, float]:
        """A no-op round trip to the guest's agent; ``agent_rtt_s`` is the daemon's part."""
        machine = await manager.machine(ref)
        return {"agent_rtt_s": await machine.agent.ping()}

    pipes: dict[str, StdinPipe] = {}

    @app.post(f"{API}/sandboxes/{{ref}}/exec")
    async def exec_(ref: str, body: ExecRequest) -> LineStream:
        machine = await manager.machine(ref)
        agent = machine.agent
        stdin: bytes | AsyncIterator[bytes] | None = None
        pipe: StdinPipe | None = None
        if body.stdin is not None:
            try:
                stdin = base64.b64decode(body.stdin, validate=True)
            except binascii.Error as exc:
                raise SpecError(f"stdin is not valid base64: {exc}") from None
            metrics.bytes.inc(len(stdin), direction="exec_stdin")
        elif body.stdin_stream:
            pipe = StdinPipe(machine.id)
            pipes[pipe.id] = pipe
            stdin = pipe.chunks()

        lines: Lines = asyncio.Queue()
        if pipe is not None:
            lines.put_nowait(_line({"exec_id": pipe.id}))
        run = asyncio.create_task(_run_exec(agent.exec, body, stdin, metrics, lines))

        def closed() -> None:
            if pipe is not None:
                pipe.close()
                pipes.pop(pipe.id, None)

        return LineStream(lines, run, on_close=closed)

    @app.put(f"{API}/sandboxes/{{ref}}/execs/{{exec_id}}/stdin")
    async def exec_stdin(ref: str, exec_id: str, request: Request) -> dict[str, Any]:
        """The stdin of a command started with ``stdin_stream``, as a streamed body."""
        machine = await manager.machine(ref)
        pipe = pipes.get(exec_id)
        if pipe is None or pipe.vm_id != machine.id:
            raise HTTPException(
                404, f"no command with exec_id {exec_id} runs in sandbox {ref}; it may have ended"
            )
        if pipe.attached:
            raise HTTPException(409, f"the stdin of exec_id {exec_id} is being sent already")
        pipe.attached = True
        try:
            sent, complete = await pipe.feed(request.stream())
        except ClientDisconnect:
            return {"bytes": 0, "complete": False}  # nobody reads this; stdin has ended
        metrics.bytes.inc(sent, direction="exec_stdin")
        return {"bytes": sent, "complete": complete}

    @app.put(f"{API}/sandboxes/{{ref}}/files")
    async def put_file(
        ref: str, request: Request, path: str = Query(min_length=1), mode: int = 0o644
    ) -> dict[str, Any]:
        machine = await manager.machine(ref)
        size = await machine.agent.write_file(path, request.stream(), mode=mode)
        metrics.bytes.inc(size, direction="files_in")
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
                    metrics.bytes.inc(len(first), direction="files_out")
                    yield first
                async for chunk in chunks:
                    metrics.bytes.inc(len(chunk), direction="files_out")
                    yield chunk
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/octet-stream")

    @app.get(f"{API}/sandboxes/{{ref}}/files/stat")
    async def stat_file(ref: str, path: str = Query(min_length=1)) -> Entry:
        machine = await manager.machine(ref)
        return Entry.from_info(await machine.agent.stat(path))

    @app.get(f"{API}/sandboxes/{{ref}}/files/list")
    async def list_files(ref: str, path: str = Query(min_length=1)) -> list[Entry]:
        machine = await manager.machine(ref)
        return [Entry.from_info(e) for e in await machine.agent.list_dir(path)]

    @app.delete(f"{API}/sandboxes/{{ref}}/files", status_code=204)
    async def remove_file(
        ref: str, path: str = Query(min_length=1), recursive: bool = False
    ) -> Response:
        machine = await manager.machine(ref)
        await machine.agent.remove(path, recursive=recursive)
        return Response(status_code=204)

    @app.post(f"{API}/sandboxes/{{ref}}/files/mkdir")
    async def make_dir(
        ref: str,
        path: str = Query(min_length=1),
        parents: bool = True,
        mode: int = Query(0o755, ge=0, le=0o7777),
    ) -> Entry:
        machine = await manager.machine(ref)
        await machine.agent.make_dir(path, parents=parents, mode=mode)
        return Entry.from_info(await machine.agent.stat(path))

    return app


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _run_exec(
    exec_fn: Any,
    body: ExecRequest,
    stdin: bytes | AsyncIterator[bytes] | None,
    metrics: Metrics,
    lines: Lines,
) -> None:
    """Run the command; queue NDJSON lines of its output as it comes, then its result."""
    started = time.monotonic()

    def out(chunk: bytes) -> None:
        metrics.bytes.inc(len(chunk), direction="exec_stdout")
        lines.put_nowait(_line({"stdout": base64.b64encode(chunk).decode()}))

    def err(chunk: bytes) -> None:
        metrics.bytes.inc(len(chunk), direction="exec_stderr")
        lines.put_nowait(_line({"stderr": base64.b64encode(chunk).decode()}))

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
        outcome = "timeout" if result.timed_out else "ok"
    except CommandTimeoutError as exc:
        outcome = "timeout"
        partial = exc.result
        final = {
            "exit_code": getattr(partial, "exit_code", None),
            "signal": getattr(partial, "signal", None),
            "timed_out": True,
        }
    except WardenError as exc:
        final = {"error": str(exc)}
        outcome = "error"
    metrics.exec_seconds.observe(time.monotonic() - started, outcome=outcome)
    lines.put_nowait(_line(final))
    lines.put_nowait(None)
