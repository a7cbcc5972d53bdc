"""``/v1/sandboxes/{ref}/exec``: run a command and stream its output; streamed stdin."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.requests import ClientDisconnect

from warden import records
from warden._errors import SpecError
from warden.audit import argv_digest
from warden.server.lines import RecordQueue, RecordStream, run_exec
from warden.server.models import ExecRequest
from warden.server.routes import API, GrantDep, ManagerDep, MetricsDep, PipesDep
from warden.server.stdin import StdinPipe

router = APIRouter(prefix=f"{API}/sandboxes")

MAX_ERROR_CHARS = 512
"""Characters of a failed command's error kept in its audit record."""


@router.post(
    "/{ref}/exec",
    response_class=RecordStream,
    status_code=200,
    responses={
        200: {
            "description": "The command's output and final status as binary records "
            "(see warden.records): [kind u8][length u32 BE][payload]; kinds 1 stdout, "
            "2 stderr, 3 a JSON control record (exec_id, then the final status or error).",
            "content": {records.MEDIA_TYPE: {}},
        }
    },
)
async def exec_(
    ref: str,
    body: ExecRequest,
    manager: ManagerDep,
    metrics: MetricsDep,
    pipes: PipesDep,
    grant: GrantDep,
) -> RecordStream:
    await grant.require_root(body.user)
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

    queue = RecordQueue()
    if pipe is not None:
        queue.put_nowait(records.encode_control({"exec_id": pipe.id}))
    args = {
        "cmd": body.cmd,
        "env": body.env,
        "cwd": body.cwd,
        "timeout": body.timeout,
        "user": body.user,
    }
    argv = ["/bin/sh", "-c", body.cmd] if isinstance(body.cmd, str) else list(body.cmd)

    async def audit(final: dict[str, Any], seconds: float) -> None:
        await manager.audit.record(
            "exec",
            sandbox=machine.id,
            outcome="error" if "error" in final else "ok",
            argv_sha256=argv_digest(argv),
            user=body.user,
            exit_code=final.get("exit_code"),
            signal=final.get("signal"),
            timed_out=final.get("timed_out"),
            error=str(final["error"])[:MAX_ERROR_CHARS] if "error" in final else None,
            duration_s=round(seconds, 4),
        )

    run = asyncio.create_task(run_exec(agent.exec, args, stdin, metrics, queue, audit))

    def closed() -> None:
        if pipe is not None:
            pipe.close()
            pipes.pop(pipe.id, None)

    return RecordStream(queue, run, on_close=closed)


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
