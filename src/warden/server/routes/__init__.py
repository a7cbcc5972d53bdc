"""The API's routes, one module per resource (as Firecracker's api_server splits them).

Each module has a ``router``; route functions reach the daemon's state through the typed
dependencies below, which read what :func:`warden.server.app.create_app` put on ``app.state``.
Every route is in ``server/access.py``'s ``ROUTES`` table (its policy action).
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Query, Request

from warden.server.access import Grant, authorize
from warden.server.limits import WorkloadUser
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


GrantDep = Annotated[Grant, Depends(authorize)]
"""Who asks and what the policy allowed them (``server/access.py``); every router is included
with :func:`authorize` as a dependency, so this is the same, cached, object."""

_USER_DOC = (
    '"user" (uid 1000) or "root"; root needs the policy\'s exec-as-root action (403 without it)'
)


async def _user(
    grant: GrantDep, user: Annotated[WorkloadUser, Query(description=_USER_DOC)] = "user"
) -> WorkloadUser:
    await grant.require_root(user)
    return user


UserDep = Annotated[WorkloadUser, Depends(_user)]
"""The ``user`` query parameter, root refused (403) unless the policy grants exec-as-root."""
