"""The REST API of the manager (FastAPI). ``create_app(manager)`` builds it.

The routes live in ``server/routes/``, one module per resource; the request and response
models in ``server/models.py``. Errors are JSON ``{"error": {"type": class, "message": ...}}``
(``api/errors.py`` has the table of statuses): 404 for an unknown id or name (and for a
sandbox the caller may not see), 403 for what the access policy denies (``server/access.py``
checks every route), 409 for a name clash, an admission refusal or a VM in the wrong state,
422 for a bad body (unknown fields included). Command output and file contents are streamed,
never buffered whole.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from warden._errors import AdmissionError, WardenError
from warden.api import errors as api_errors
from warden.server.access import AccessControl, audit_denials, authorize
from warden.server.audit import PrincipalContext
from warden.server.limits import BodyLimit
from warden.server.manager import Manager
from warden.server.metrics import Metrics
from warden.server.routes import (
    auth,
    events,
    files,
    links,
    sandboxes,
    system,
    templates,
    tokens,
)
from warden.server.routes import exec as exec_routes
from warden.server.stdin import StdinPipe


def _error(exc: WardenError) -> JSONResponse:
    """The answer to ``exc``: ``{"error": {"type": class name, "message": ...}}`` with the
    status of ``api/errors.py``'s table. Clients raise the class, never read the message."""
    return JSONResponse(api_errors.body_of(exc), status_code=api_errors.status_of(exc))


def _problems(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Each problem's place and message, without the input: that can be large, and not JSON
    (``NaN``), and the client has it."""
    return [
        {"type": str(e.get("type")), "loc": [str(p) for p in e.get("loc", ())], "msg": e["msg"]}
        for e in exc.errors()
    ]


def _invalid_message(problems: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems)


def _freeze_heap() -> None:
    """Take what start-up made (modules, the app, its models and routes: ~80,000 objects)
    out of the cyclic GC's reach (``gc.freeze``), after one last collection. They live as
    long as the daemon, yet each full collection walked them all again, in the event loop,
    while every request waited: 14-28 ms with no VM, 31-82 ms with 21 (measured in the
    daemon); only what came after start-up is walked now."""
    gc.collect()
    gc.freeze()


def _lifespan(
    manager: Manager, manage: bool
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: with ``manage``, start ``manager`` and close it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            _freeze_heap()  # before the VMs it reattaches: their objects go when they do
            await manager.start()
        try:
            yield
        finally:
            if manage:
                await manager.close()

    return lifespan


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer every error with the API's error body (``server/errors.py``)."""

    @app.exception_handler(WardenError)
    async def _warden_error(request: Request, exc: WardenError) -> JSONResponse:
        if isinstance(exc, AdmissionError):
            metrics.refused(exc.limits)
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = _problems(exc)
        answer = api_errors.body("SpecError", _invalid_message(problems), problems=problems)
        return JSONResponse(answer, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        answer = api_errors.body(api_errors.HTTP_ERROR, str(exc.detail))
        return JSONResponse(answer, status_code=exc.status_code, headers=exc.headers)


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
    if manager is not None and control.on_denied is None:  # None: the OpenAPI spec's build
        control.on_denied = audit_denials(manager)

    app = FastAPI(title="warden", version="1", lifespan=_lifespan(manager, manage_lifespan))
    metrics = Metrics()
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.pipes = dict[str, StdinPipe]()
    app.state.access = control
    app.add_middleware(BodyLimit)
    app.add_middleware(PrincipalContext)  # the audit log's principal (server/audit.py)
    _add_error_handlers(app, metrics)
    for module in (sandboxes, templates, events, system, exec_routes, files, auth, tokens, links):
        app.include_router(module.router, dependencies=[Depends(authorize)])
    return app
