"""The REST API of the manager (FastAPI). ``create_app(manager)`` builds it.

The routes live in ``server/routes/``, one module per resource; the request and response
models in ``server/models.py``. Errors are JSON ``{"detail": message}``: 404 for an unknown id
or name (and for a sandbox the caller may not see), 403 for what the access policy denies,
409 for a name clash, an admission refusal or a VM in the wrong state, 422 for a bad body
(unknown fields included). Command output and file contents are streamed, never
buffered whole.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from warden._errors import (
    AdmissionError,
    AgentError,
    AgentTimeoutError,
    GuestFileError,
    ImageNotFoundError,
    NameConflictError,
    PausedStateError,
    PermissionDeniedError,
    PolicyError,
    SandboxClosedError,
    SpecError,
    StateTransitionError,
    TemplateError,
    TemplateNotFoundError,
    VMNotFoundError,
    WardenError,
)
from warden.server.access import AccessControl, authorize
from warden.server.limits import BodyLimit
from warden.server.manager import Manager
from warden.server.metrics import Metrics
from warden.server.routes import events, files, sandboxes, system, templates
from warden.server.routes import exec as exec_routes
from warden.server.stdin import StdinPipe


def _error(status: int, exc: BaseException) -> JSONResponse:
    """``{"detail": message, "error": class name}``: clients tell errors apart by the class,
    never by the message (the SDK raises the same class as embedded mode)."""
    return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status)


_STATUS: tuple[tuple[type[WardenError], int], ...] = (
    (PermissionDeniedError, 403),  # the access policy (a guest operation refused too)
    (PolicyError, 409),  # a reload of a bad policy.toml: the old policy stays
    (VMNotFoundError, 404),
    (ImageNotFoundError, 404),
    (NameConflictError, 409),
    (TemplateNotFoundError, 404),
    (TemplateError, 409),  # refused (its seal, image or QEMU changed), or not from a clone
    (StateTransitionError, 409),
    (PausedStateError, 409),  # a paused VM's saved state was refused (tampered, say)
    (AdmissionError, 409),
    (SpecError, 422),
    (SandboxClosedError, 409),  # the VM was stopped or died under the request
    (AgentTimeoutError, 504),  # the guest's agent did not answer in time
    (AgentError, 502),  # the guest's agent failed or broke the protocol
)
"""The HTTP status of each error the API expects, first match wins; any other WardenError is
a 500 (the daemon's own fault). Bad input never gets that far: the models refuse it (422)."""


def _problems(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Each problem's place and message, without the input: that can be large, and not JSON
    (``NaN``), and the client has it."""
    return [
        {"type": str(e.get("type")), "loc": [str(p) for p in e.get("loc", ())], "msg": e["msg"]}
        for e in exc.errors()
    ]


def _status(exc: WardenError) -> int:
    if isinstance(exc, GuestFileError):
        return 404 if exc.errno == errno.ENOENT else 400
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


def create_app(
    manager: Manager,
    *,
    manage_lifespan: bool = True,
    allow_root: bool = False,
    access: AccessControl | None = None,
) -> FastAPI:
    """The API over ``manager``. With ``manage_lifespan``, the app starts the manager (which
    reattaches to live VMs) and closes it on shutdown (leaving VMs running).

    Every route is checked against the access policy (``access``; by default the one of
    ``manager.paths``, read now: PolicyError if its file is bad). ``allow_root`` is the
    deprecated ``warden serve --allow-root``: it grants exec-as-root to every caller."""
    control = access or AccessControl.load(manager.paths, root_for_all=allow_root)

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
    app.state.access = control
    app.add_middleware(BodyLimit)

    @app.exception_handler(WardenError)
    async def _warden_error(request: Request, exc: WardenError) -> JSONResponse:
        if isinstance(exc, AdmissionError):
            metrics.refused(exc.limits)
        return _error(_status(exc), exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _problems(exc)}, status_code=422)

    for module in (sandboxes, templates, events, system, exec_routes, files):
        app.include_router(module.router, dependencies=[Depends(authorize)])
    return app
