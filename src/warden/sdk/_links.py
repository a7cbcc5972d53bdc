"""``sbx.links``: VM-to-VM links of a daemon's sandbox (``warden.links``).

A link needs the daemon, which relays it: an embedded sandbox raises ``LinkError`` saying so.
In the guest, a link is the unix socket ``/run/warden/links/NAME.sock`` (see docs/design.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from warden._errors import LinkError
from warden.sdk import _portal

if TYPE_CHECKING:
    from warden.sdk._async import AsyncSandbox
    from warden.sdk._remote import RemoteMachine

EMBEDDED = (
    "links need the daemon, which relays them: start `warden serve` and make the sandboxes "
    "with warden.connect() (an embedded sandbox cannot be linked)"
)


class AsyncLinks:
    """The links of one sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    def _remote(self) -> RemoteMachine:
        from warden.sdk._remote import RemoteMachine

        machine = self._sandbox._machine
        if not isinstance(machine, RemoteMachine):
            raise LinkError(EMBEDDED)
        return machine

    async def create(
        self, other: AsyncSandbox | str, name: str, *, transport: str = "ring"
    ) -> dict[str, Any]:
        """Link this sandbox (end ``a``) to ``other`` (a sandbox, id or name; end ``b``) as
        ``name``: each gets ``/run/warden/links/NAME.sock``. ``transport``: ``ring`` (shared
        memory between the two VMs) or ``relay`` (through the daemon). LinkError (nothing
        left open) if they are the same, the name is taken, a sandbox has no free link slot
        or an end cannot be opened; StateTransitionError if either is not running."""
        other_id = other if isinstance(other, str) else other.id
        body = {"a": self._sandbox.id, "b": other_id, "name": name, "transport": transport}
        return cast(dict[str, Any], await self._remote().links_call("POST", "", body))

    async def list(self) -> list[dict[str, Any]]:
        """The open links with an end in this sandbox."""
        rows = cast(list[dict[str, Any]], await self._remote().links_call("GET", ""))
        return [r for r in rows if self._sandbox.id in (r.get("a"), r.get("b"))]

    async def remove(self, name: str) -> dict[str, Any]:
        """Close both ends of link ``name`` (each client sees an error); LinkNotFoundError if
        there is none. The answer has ``closed_ms``."""
        return cast(dict[str, Any], await self._remote().links_call("DELETE", f"/{name}"))


class Links:
    """The sync twin of :class:`AsyncLinks`."""

    def __init__(self, inner: AsyncLinks) -> None:
        self._inner = inner

    def create(self, other: Any, name: str, *, transport: str = "ring") -> dict[str, Any]:
        """See :meth:`AsyncLinks.create` (``other``: a Sandbox, or an id or name)."""
        target = other if isinstance(other, str) else other.id
        return _portal.call(self._inner.create(target, name, transport=transport))

    def list(self) -> list[dict[str, Any]]:
        return _portal.call(self._inner.list())

    def remove(self, name: str) -> dict[str, Any]:
        return _portal.call(self._inner.remove(name))
