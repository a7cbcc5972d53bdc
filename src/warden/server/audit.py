"""The daemon's side of the audit log (``warden.audit``): who did what, recorded before the
answer goes out.

- Every request runs with its principal in :data:`CURRENT` (set by :class:`PrincipalContext`
  from what the authenticating middleware found), so code deep in the manager records the
  right name without passing it down. What the daemon does on its own (warm pool refills,
  recovery after a restart) is recorded as :data:`SYSTEM`.
- Lifecycle changes of the manager are recorded by :func:`audited` on its methods; exec and
  file transfers by their routes; denials by the access policy.
- A record that cannot be written fails the request (``AuditLogError``, a 500): nothing is
  done unrecorded. When the manager has no log (in-process tests that build one without a
  home's log), :class:`Auditor` records nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from warden._errors import WardenError
from warden.audit import AuditLog
from warden.auth.principal import Principal, principal_of

SYSTEM = "warden"
"""The principal of what the daemon does on its own."""

CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "warden_principal", default=None
)
"""The principal of the request being served (None outside a request)."""

Field = str | int | float | bool | None


class PrincipalContext:
    """ASGI middleware: run each request with its principal in :data:`CURRENT`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = CURRENT.set(principal_of(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT.reset(token)


def current_name() -> str:
    """The name of the principal being served, or :data:`SYSTEM`."""
    principal = CURRENT.get()
    return principal.name if principal is not None else SYSTEM


class Auditor:
    """Appends the daemon's records to its audit log (none: records nothing)."""

    def __init__(self, log: AuditLog | None = None) -> None:
        self.log = log

    async def record(
        self,
        action: str,
        *,
        sandbox: str | None = None,
        outcome: str = "ok",
        principal: str | None = None,
        fields: Mapping[str, Field] | None = None,
        **more: Field,
    ) -> None:
        """Append a record with ``fields`` and ``more``; it is on disk when this returns. The
        principal defaults to the one being served (:func:`current_name`)."""
        if self.log is None:
            return
        who = principal if principal is not None else current_name()
        await self.log.append_async(
            action, principal=who, sandbox=sandbox, outcome=outcome, **{**(fields or {}), **more}
        )

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class _Audited(Protocol):
    audit: Auditor


S = TypeVar("S", bound=_Audited)
P = ParamSpec("P")
R = TypeVar("R")

Details = Callable[[tuple[Any, ...], dict[str, Any], Any], dict[str, Field]]
"""The fields of a successful call's record, from its arguments and its result."""


def _sandbox_of(args: tuple[Any, ...], result: Any, by_arg: bool) -> str | None:
    if not by_arg:
        return None
    ident = getattr(result, "id", None)
    if isinstance(ident, str):
        return ident
    return args[0] if args and isinstance(args[0], str) else None


def audited(
    action: str, details: Details | None = None, *, sandbox: bool = True
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Record each call of a manager method as ``action``: ``ok`` with ``details``, or
    ``error`` naming the error's class. The sandbox is the result's ``id``, else the first
    argument (an id or name); none without ``sandbox``."""

    def wrap(
        fn: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = await fn(self, *args, **kwargs)
            except (WardenError, asyncio.CancelledError) as exc:
                await asyncio.shield(
                    self.audit.record(
                        action,
                        sandbox=_sandbox_of(args, None, sandbox),
                        outcome="error",
                        error=type(exc).__name__,
                    )
                )
                raise
            extra = details(args, kwargs, result) if details is not None else {}
            await self.audit.record(
                action, sandbox=_sandbox_of(args, result, sandbox), fields=extra
            )
            return result

        return call

    return wrap
