"""The API's routes, one module per resource (as Firecracker's api_server splits them).

Each module has a ``router``; route functions reach the daemon's state through the typed
dependencies below, which read what :func:`warden.server.app.create_app` put on ``app.state``.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, HTTPException, Query, Request

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


def require_user(user: WorkloadUser, allow_root: bool) -> None:
    """Refuse (403) root in the guest on a daemon that was not started with --allow-root."""
    if user == "root" and not allow_root:
        raise HTTPException(
            403,
            'this daemon does not run anything as the guest\'s root; use "user": "user", or '
            "start the daemon with `warden serve --allow-root`",
        )


def _allow_root(request: Request) -> bool:
    return bool(request.app.state.allow_root)


_USER_DOC = (
    '"user" (uid 1000) or "root"; a daemon refuses root (403) unless it was started with '
    "--allow-root"
)


def _user(
    request: Request, user: Annotated[WorkloadUser, Query(description=_USER_DOC)] = "user"
) -> WorkloadUser:
    require_user(user, _allow_root(request))
    return user


AllowRootDep = Annotated[bool, Depends(_allow_root)]
"""Whether the daemon was started with --allow-root."""
UserDep = Annotated[WorkloadUser, Depends(_user)]
"""The ``user`` query parameter, root refused where it is not allowed."""
