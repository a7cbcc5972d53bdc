"""Enforcement of the access policy on every route of the API.

:data:`ROUTES` is the one table of what each route needs: its policy action, what the action is
about (one sandbox, the daemon, a create, or a listing the route filters), the guest operation
it asks of the sandbox's agent, and where it may ask for the guest's root. Every router is
included with :func:`authorize` as a dependency (``server/app.py``), which looks the matched
route up in this table, so a route missing from it is refused for everyone, and
``tests/security/test_access_matrix.py`` fails on it.

For a route about one sandbox, :func:`authorize` resolves the ``{ref}`` and answers 404, as
for a sandbox that does not exist, when the caller may neither ``inspect`` it nor do the
route's action: a caller learns nothing of sandboxes it may not see. A caller that may see it
but not do the action gets a 403 naming the action and the rule (or "no rule allows"). A guest
operation the sandbox's ``[[guest]]`` rules refuse is a 403 for everyone
(:class:`~warden._errors.GuestOperationRefusedError`).

Every denial goes through :meth:`AccessControl.deny`, which awaits ``on_denied`` before it
raises: ``create_app`` sets it to record the denial in the daemon's audit log (outcome
``denied``, with the rule), so a denied request is answered only once it is recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, NoReturn, cast

from fastapi import Request

from warden._errors import GuestOperationRefusedError, PermissionDeniedError, VMNotFoundError
from warden.auth.principal import Principal, principal_of
from warden.config import Paths
from warden.policy.access import Decision, Policy, Target, load_policy, target_of
from warden.server.manager import Manager
from warden.store.db import VMRow

Kind = Literal["sandbox", "daemon", "create", "filtered", "open", "link"]


@dataclass(frozen=True)
class RouteAccess:
    """What a route needs. ``kind``: ``sandbox`` (the ``{ref}`` one, checked here),
    ``daemon`` (checked here), ``create`` (the route checks the sandbox it would make),
    ``filtered`` (the route shows only what the caller may ``inspect``), ``open`` (no
    action: any authenticated caller, for what only tells the caller about itself) or
    ``link`` (the route checks the action on both sandboxes of a link:
    :meth:`Grant.require_sandbox`). ``guest``: the
    guest operation it asks of the agent. ``root``: where a request may ask for the guest's
    root (then it also needs ``exec-as-root``)."""

    action: str
    kind: Kind = "sandbox"
    guest: str | None = None
    root: Literal["body", "query"] | None = None


_SB = "/v1/sandboxes/{ref}"

ROUTES: dict[tuple[str, str], RouteAccess] = {
    ("POST", "/v1/sandboxes"): RouteAccess("create", "create"),
    ("GET", "/v1/sandboxes"): RouteAccess("inspect", "filtered"),
    ("GET", _SB): RouteAccess("inspect"),
    ("DELETE", _SB): RouteAccess("rm"),
    ("POST", f"{_SB}/stop"): RouteAccess("stop"),
    ("POST", f"{_SB}/pause"): RouteAccess("pause"),
    ("POST", f"{_SB}/resume"): RouteAccess("pause"),
    ("POST", f"{_SB}/fork"): RouteAccess("fork"),
    ("POST", f"{_SB}/template"): RouteAccess("template"),
    ("GET", f"{_SB}/logs"): RouteAccess("inspect"),
    ("GET", f"{_SB}/guest"): RouteAccess("inspect", guest="info"),
    ("POST", f"{_SB}/ping"): RouteAccess("inspect", guest="info"),
    ("POST", f"{_SB}/exec"): RouteAccess("exec", guest="exec", root="body"),
    ("PUT", f"{_SB}/execs/{{exec_id}}/stdin"): RouteAccess("exec", guest="exec"),
    ("PUT", f"{_SB}/files"): RouteAccess("files-write", guest="files-write", root="query"),
    ("DELETE", f"{_SB}/files"): RouteAccess("files-write", guest="files-write", root="query"),
    ("POST", f"{_SB}/files/mkdir"): RouteAccess("files-write", guest="files-write", root="query"),
    ("GET", f"{_SB}/files"): RouteAccess("files-read", guest="files-read", root="query"),
    ("GET", f"{_SB}/files/stat"): RouteAccess("files-read", guest="files-read", root="query"),
    ("GET", f"{_SB}/files/list"): RouteAccess("files-read", guest="files-read", root="query"),
    ("GET", "/v1/templates"): RouteAccess("inspect", "daemon"),
    ("DELETE", "/v1/templates/{name}"): RouteAccess("admin", "daemon"),
    ("GET", "/v1/events"): RouteAccess("inspect", "filtered"),
    ("GET", "/v1/info"): RouteAccess("admin", "daemon"),
    ("GET", "/metrics"): RouteAccess("admin", "daemon"),
    ("POST", "/v1/policy/reload"): RouteAccess("admin", "daemon"),
    ("GET", "/v1/whoami"): RouteAccess("", "open"),
    ("POST", "/v1/links"): RouteAccess("link", "link"),
    ("GET", "/v1/links"): RouteAccess("link", "filtered"),
    ("DELETE", "/v1/links/{name}"): RouteAccess("link", "link"),
    ("POST", "/v1/tokens"): RouteAccess("admin", "daemon"),
    ("GET", "/v1/tokens"): RouteAccess("admin", "daemon"),
    ("DELETE", "/v1/tokens/{which}"): RouteAccess("admin", "daemon"),
}
"""Every API route (method, path template) and what it needs: the table of record, which
the access-matrix test walks."""

ROOT_ALIAS_RULE = "`warden serve --allow-root` (deprecated): exec-as-root for everyone"


@dataclass(frozen=True)
class Denial:
    """A denied request, as the ``on_denied`` hook gets it."""

    principal: Principal
    action: str
    target: Target | None
    decision: Decision
    guest: bool = False
    """The sandbox's ``[[guest]]`` rules refused it (not the caller's permissions)."""


class AccessControl:
    """The daemon's policy in force, how to reload it, and the one way to deny."""

    def __init__(self, paths: Paths, policy: Policy, *, root_for_all: bool = False) -> None:
        self.paths = paths
        self.root_for_all = root_for_all
        self.policy = policy
        self.on_denied: Callable[[Denial], Awaitable[None]] | None = None
        """Awaited with every denial before it is answered (the audit log's record)."""
        self._lock = threading.Lock()

    @classmethod
    def load(cls, paths: Paths, *, root_for_all: bool = False) -> AccessControl:
        """The policy of ``paths`` (PolicyError if its file is bad: the daemon refuses to
        start)."""
        return cls(paths, load_policy(paths), root_for_all=root_for_all)

    def reload(self) -> Policy:
        """Read ``policy.toml`` again. A bad file raises PolicyError and the old policy stays."""
        with self._lock:
            self.policy = load_policy(self.paths)
            return self.policy

    def decide(self, principal: Principal, action: str, target: Target) -> Decision:
        decision = self.policy.decide(principal, action, target)
        if (
            not decision.allowed
            and self.root_for_all
            and action == "exec-as-root"
            and decision.rule.startswith("no rule")
        ):
            return Decision(True, ROOT_ALIAS_RULE)
        return decision

    async def deny(
        self,
        principal: Principal,
        action: str,
        target: Target | None,
        decision: Decision,
        *,
        conceal: str | None = None,
        guest: bool = False,
    ) -> NoReturn:
        """Record a denial (``on_denied``) and raise: VMNotFoundError for the sandbox ref
        ``conceal`` (its existence is not told), GuestOperationRefusedError for a guest
        operation, else PermissionDeniedError naming the action and the rule."""
        if self.on_denied is not None:
            await self.on_denied(Denial(principal, action, target, decision, guest))
        if conceal is not None:
            raise VMNotFoundError(f"no VM has id or name {conceal!r}; `warden ps --all` lists them")
        what = target.describe() if target is not None else "this route"
        if guest:
            raise GuestOperationRefusedError(
                f"{what} does not accept the guest operation {action}, whoever asks: its "
                f"policy refuses it ({decision.rule}); change the [[guest]] rules of "
                "policy.toml and run `warden policy reload`"
            )
        raise PermissionDeniedError(
            f"{principal.name} may not {action} {what}: {decision.rule}; ask an admin to "
            "grant it in policy.toml"
        )

    async def require(self, principal: Principal, action: str, target: Target) -> Decision:
        """The allowing decision, or a denial."""
        decision = self.decide(principal, action, target)
        if not decision.allowed:
            await self.deny(principal, action, target, decision)
        return decision

    def may(self, principal: Principal, action: str, target: Target) -> bool:
        """A quiet check, for filtering what a listing shows (not a denial)."""
        return self.decide(principal, action, target).allowed


def audit_denials(manager: Manager) -> Callable[[Denial], Awaitable[None]]:
    """The ``on_denied`` hook that records a denial in ``manager``'s audit log (outcome
    ``denied``): the action, the sandbox, the caller's roles and how it came, the rule, and
    whether it was the sandbox's guest policy. A record that cannot be written fails the
    request (a 500), as every audit record does."""

    async def record(denial: Denial) -> None:
        target = denial.target
        await manager.audit.record(
            denial.action,
            sandbox=target.id if target is not None else None,
            outcome="denied",
            principal=denial.principal.name,
            roles=",".join(sorted(denial.principal.roles)),
            via=denial.principal.via,
            rule=denial.decision.rule,
            guest=denial.guest,
        )

    return record


@dataclass(frozen=True)
class Grant:
    """What :func:`authorize` established for a request: who asks, under which policy, and
    (for a sandbox route) the sandbox."""

    principal: Principal
    control: AccessControl
    route: RouteAccess
    row: VMRow | None = None

    @property
    def target(self) -> Target:
        return target_of(self.row) if self.row is not None else Target.daemon()

    async def require_root(self, user: str, target: Target | None = None) -> None:
        """A request for the guest's root also needs ``exec-as-root``."""
        if user == "root":
            await self.control.require(self.principal, "exec-as-root", target or self.target)

    def may(self, action: str, target: Target) -> bool:
        return self.control.may(self.principal, action, target)

    async def require(self, action: str, target: Target) -> Decision:
        return await self.control.require(self.principal, action, target)

    async def require_sandbox(self, manager: Manager, ref: str) -> VMRow:
        """The route's action on sandbox ``ref`` (for a route about several, such as a
        link's two ends), with :func:`authorize`'s answers: 404 if it does not exist or the
        caller may not see it, 403 if the caller may see it but not do the action."""
        row = await manager.get(ref)
        target = target_of(row)
        decision = self.control.decide(self.principal, self.route.action, target)
        if not decision.allowed:
            hidden = not self.control.may(self.principal, "inspect", target)
            await self.control.deny(
                self.principal, self.route.action, target, decision, conceal=ref if hidden else None
            )
        return row

    def sees_everything(self) -> bool:
        """Whether the caller may ``admin`` the daemon (then listings are not filtered)."""
        return self.may("admin", Target.daemon())


def control_of(request: Request) -> AccessControl:
    return cast(AccessControl, request.app.state.access)


async def authorize(request: Request) -> Grant:
    """The dependency of every API route: check the route's action (and guest operation)
    for the caller, per :data:`ROUTES`; a route not in it is refused."""
    control = control_of(request)
    principal = principal_of(request.scope)
    route = request.scope.get("route")
    path = str(getattr(route, "path", request.url.path))
    needs = ROUTES.get((request.method, path))
    if needs is None:
        refused = Decision(False, f"{request.method} {path} declares no action in ROUTES")
        await control.deny(principal, "undeclared", None, refused)
    if needs.kind == "daemon":
        await control.require(principal, needs.action, Target.daemon())
    if needs.kind != "sandbox":
        return Grant(principal, control, needs)
    manager = cast(Manager, request.app.state.manager)
    ref = str(request.path_params["ref"])
    try:
        row = await manager.get(ref)
    except VMNotFoundError as exc:
        if needs.action != "inspect":  # a refused change or run is audited, as the manager's
            await manager.audit.record(
                needs.action, sandbox=ref, outcome="error", error=type(exc).__name__
            )
        raise
    target = target_of(row)
    decision = control.decide(principal, needs.action, target)
    if not decision.allowed:
        hidden = needs.action != "inspect" and not control.may(principal, "inspect", target)
        concealed = ref if hidden or needs.action == "inspect" else None
        await control.deny(principal, needs.action, target, decision, conceal=concealed)
    if needs.guest is not None:
        accepted = control.policy.guest_allows(needs.guest, target)
        if not accepted.allowed:
            await control.deny(principal, needs.guest, target, accepted, guest=True)
    return Grant(principal, control, needs, row)
