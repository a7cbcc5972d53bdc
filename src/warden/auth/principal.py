"""The caller of a request: a :class:`Principal`, named and carrying roles.

A request gets its principal from the listener it came in on (``auth/`` middleware): the peer
credentials (``SO_PEERCRED``) of a unix-socket client, or the token of a TCP client. The
middleware puts it into the ASGI scope under :data:`SCOPE_KEY`; routes read it with
:func:`principal_of`. What a principal may do is decided by the policy (``policy/access.py``)
from its name and roles, never by how it connected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SCOPE_KEY = "warden.principal"
"""Where the authenticating middleware leaves the :class:`Principal` in the ASGI scope."""

Via = Literal["unix", "token", "local"]


@dataclass(frozen=True)
class Principal:
    """Who made a request.

    ``name`` is the owner recorded on what it creates: a unix user's login name (``uid:N``
    when the uid has no passwd entry), or the principal name of a token. ``roles`` select the
    policy's rules. ``via`` says how it was established: ``unix`` (peer credentials),
    ``token`` (a bearer token) or ``local`` (in-process, embedded mode and tests).
    """

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    via: Via = "local"
    uid: int | None = None
    token_id: str | None = None

    def describe(self) -> str:
        """``name (roles: a, b; via unix uid 1000)``, for messages and the audit log."""
        roles = ", ".join(sorted(self.roles)) or "none"
        how = f"via {self.via}" + (f" uid {self.uid}" if self.uid is not None else "")
        return f"{self.name} (roles: {roles}; {how})"


LOCAL_ADMIN = Principal(name="root", roles=frozenset({"admin"}), via="local", uid=0)
"""The principal of a request that no middleware authenticated (an app built without one, as
in-process tests do): the daemon's own user, an admin."""


def principal_of(scope: Mapping[str, Any]) -> Principal:
    """The principal the middleware found for this request, or :data:`LOCAL_ADMIN`."""
    found = scope.get(SCOPE_KEY)
    return found if isinstance(found, Principal) else LOCAL_ADMIN
