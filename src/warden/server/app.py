"""The REST API of the manager (FastAPI). ``create_app(manager)`` builds it.

The routes live in ``server/routes/``, one module per resource; the request and response
models in ``server/models.py``. Errors are JSON ``{"detail": message}``: 404 for an unknown id
or name, 409 for a name clash, an admission refusal or a VM in the wrong state, 422 for a bad
body (unknown fields included). Command output and file contents are streamed, never
buffered whole.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from warden._errors import (
    AdmissionError,
    GuestFileError,
    ImageNotFoundError,
    NameConflictError,
    SpecError,
    StateTransitionError,
    VMNotFoundError,
    WardenError,
)
from warden.server.manager import Manager
from warden.server.metrics import Metrics
from warden.server.routes import events, files, sandboxes, system
from warden.server.routes import exec as exec_routes
from warden.server.stdin import StdinPipe


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
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.pipes = dict[str, StdinPipe]()

    @app.exception_handler(WardenError)
    async def _warden_error(request: Request, exc: WardenError) -> JSONResponse:
        if isinstance(exc, AdmissionError):
            metrics.refused(str(exc))
        return _error(_status(exc), exc)

    for module in (sandboxes, events, system, exec_routes, files):
        app.include_router(module.router)
    return app
