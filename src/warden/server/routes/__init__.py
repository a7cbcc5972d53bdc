"""The API's routes, one module per resource (as Firecracker's api_server splits them).

Each module has a ``router``; route functions reach the daemon's state through the typed
dependencies below, which read what :func:`warden.server.app.create_app` put on ``app.state``.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from warden.server.manager import Manager
from warden.server.metrics import Metrics
from warden.server.stdin import StdinPipe

API = "/v1"


def _manager(request: Request) -> Manager:
    return cast(Manager, request.app.state.manager)


def _metrics(request: Request) -> Metrics:
    return cast(Metrics, request.app.state.metrics)


def _pipes(request: Request) -> dict[str, StdinPipe]:
    return cast(dict[str, StdinPipe], request.app.state.pipes)


ManagerDep = Annotated[Manager, Depends(_manager)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
PipesDep = Annotated[dict[str, StdinPipe], Depends(_pipes)]
"""The streamed-stdin pipes of running commands, by exec_id."""
