"""The bounds on the daemon's client connections (``server/connections.py``), on a real
uvicorn server on a unix socket with a trivial app and small bounds: the connection over a
bound gets a 503 ``TooManyConnectionsError`` that says which and what to do, and is closed;
a connection that never asks for anything is closed after its deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from warden._errors import TooManyConnectionsError
from warden.api import errors as api_errors
from warden.server import connections
from warden.server.connections import ConnectionLimits, limited

REQUEST = b"GET / HTTP/1.1\r\nhost: warden\r\n\r\n"


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def server(
    path: Path, limits: ConnectionLimits, keep_alive_s: int = 30
) -> AsyncIterator[uvicorn.Server]:
    config = uvicorn.Config(
        ok_app,
        uds=str(path),
        http=limited(limits),
        lifespan="off",
        log_level="critical",
        timeout_keep_alive=keep_alive_s,
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield srv
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    await asyncio.sleep(0.05)  # the server has made it (connection_made)
    return reader, writer


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
    """One request; the status and body of its answer."""
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split()[1])
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return status, await reader.readexactly(length)


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except TimeoutError:
        return False


def test_a_caller_over_its_bound_gets_a_503_that_says_why(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "api.sock"
        async with server(path, ConnectionLimits(total=10, per_peer=2)):
            first, second = await connect(path), await connect(path)
            third = await connect(path)
            status, body = await ask(*third)
            assert status == 503
            answer = api_errors.parse(status, body)
            assert answer.type == "TooManyConnectionsError"
            assert "the limit for one caller; close idle ones" in answer.message
            assert isinstance(api_errors.to_exception(answer), TooManyConnectionsError)
            assert await closed(third[0], 2.0), "the refused connection stayed open"
            assert await ask(*first) == (200, b"ok")  # those under the bound work on
            second[1].close()
            await asyncio.sleep(0.1)
            assert await ask(*await connect(path)) == (200, b"ok")  # a freed place is taken

    asyncio.run(main())


def test_the_listener_bound_holds_for_all_callers(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "api.sock"
        async with server(path, ConnectionLimits(total=2, per_peer=100)):
            held = [await connect(path), await connect(path)]
            status, body = await ask(*await connect(path))
            assert status == 503
            message = json.loads(body)["error"]["message"]
            assert "has 2 client connections open, its limit" in message
            assert await ask(*held[1]) == (200, b"ok")

    asyncio.run(main())


def test_connections_that_ask_nothing_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One under the bound after the keep-alive time, one over it after REFUSE_GRACE_S: a
    caller cannot hold the daemon's open files by connecting and saying nothing."""
    monkeypatch.setattr(connections, "REFUSE_GRACE_S", 0.3)

    async def main() -> None:
        path = tmp_path / "api.sock"
        async with server(path, ConnectionLimits(total=10, per_peer=1), keep_alive_s=1):
            silent = await connect(path)
            over = await connect(path)
            assert await closed(over[0], 1.0), "the connection over the bound stayed open"
            assert not silent[0].at_eof()
            assert await closed(silent[0], 3.0), "a silent connection was never closed"

    asyncio.run(main())
