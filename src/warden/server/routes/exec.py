"""``/v1/sandboxes/{ref}/exec``: run a command and stream its output; streamed stdin."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.requests import ClientDisconnect

from warden._errors import CommandTimeoutError, SpecError, WardenError
from warden.agent.client import ExecResult
from warden.server.lines import Lines, LineStream
from warden.server.metrics import Metrics
from warden.server.models import ExecRequest
from warden.server.routes import (
    API,
    AllowRootDep,
    ManagerDep,
    MetricsDep,
    PipesDep,
    require_user,
)
from warden.server.stdin import StdinPipe

router = APIRouter(prefix=f"{API}/sandboxes")


@router.post("/{ref}/exec")
async def exec_(
    ref: str,
    body: ExecRequest,
    manager: ManagerDep,
    metrics: MetricsDep,
    pipes: PipesDep,
    allow_root: AllowRootDep,
) -> LineStream:
    require_user(body.user, allow_root)
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


@router.put("/{ref}/execs/{exec_id}/stdin")
async def exec_stdin(
    ref: str,
    exec_id: str,
    request: Request,
    manager: ManagerDep,
    metrics: MetricsDep,
    pipes: PipesDep,
) -> dict[str, Any]:
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
            user=body.user,
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
