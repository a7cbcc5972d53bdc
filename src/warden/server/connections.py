"""Bounds on the daemon's client connections, for each listener (the unix socket, TCP).

uvicorn bounds none: every connection it accepts costs the daemon an open file for as long as
the client keeps it, and one that never sends a request is never closed. So one caller could
take the open files that VMs need (``server/run.py:raise_fd_limit``) or crowd out every other
caller. :class:`LimitedProtocol`, uvicorn's h11 protocol with bounds, gives each connection:

* a deadline for its first request, the keep-alive time (``KEEP_ALIVE_S``): a connection that
  never asks for anything is closed then, as an idle one is after a response;
* a place under a bound of connections open at once on its listener, and under another of
  those from the same peer (a unix peer's uid, a TCP client's address): a quarter of the
  daemon's open files for each listener (at most :data:`MAX_CONNECTIONS`), half of that for
  one peer (:func:`for_open_files`), so that connections never take more than half of the
  daemon's open files, and the VMs keep the rest.

A connection over either bound is still accepted (a client that is refused at ``connect``
cannot tell why), but its first request is answered 503 ``TooManyConnectionsError``, saying
which bound and what to do, and the connection is closed after that answer, or after
:data:`REFUSE_GRACE_S` if no request comes. Nothing that request asked for runs.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from warden._errors import TooManyConnectionsError
from warden.api import errors as api_errors
from warden.auth.unix import peer_ids

__all__ = [
    "MAX_CONNECTIONS",
    "REFUSE_GRACE_S",
    "ConnectionLimits",
    "LimitedProtocol",
    "for_open_files",
    "limited",
]

MAX_CONNECTIONS = 8192
"""The most client connections open at once on one listener (each is an open file)."""
REFUSE_GRACE_S = 5.0
"""How long a connection over a bound may wait to send the request that gets the refusal."""


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = MAX_CONNECTIONS
    """Connections open at once on one listener."""
    per_peer: int = MAX_CONNECTIONS // 2
    """Of those, from one peer. The SDK keeps a sandbox's connections open for its next
    calls (about two per sandbox: its API client's and its exec's), so one process that holds
    N sandboxes holds about 2N."""


def for_open_files(nofile: int) -> ConnectionLimits:
    """The bounds for a daemon allowed ``nofile`` open files: a quarter of them for each of
    its two listeners (64 to :data:`MAX_CONNECTIONS`), half of that for one peer."""
    total = max(64, min(MAX_CONNECTIONS, nofile // 4))
    return ConnectionLimits(total, total // 2)


class LimitedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds of this module (``uvicorn.Config(http=...)``;
    :func:`limited` makes one with other bounds)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    peer_key: object = None
    _closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer_key = _peer_key(transport)
        refusal = self._refusal()
        if refusal is None:  # the first request's deadline: what an idle connection gets
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
            return
        self.app = _Refuse(refusal)
        self._closer = self.loop.call_later(REFUSE_GRACE_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
        super().connection_lost(exc)

    def _refusal(self) -> str | None:
        """Why this new connection is over a bound, or None."""
        limits = self.limits
        if len(self.connections) > limits.total:
            return (
                f"the warden daemon has {limits.total} client connections open, its limit; "
                "close idle ones, or retry later"
            )
        mine = sum(1 for c in self.connections if getattr(c, "peer_key", None) == self.peer_key)
        if mine > limits.per_peer:
            return (
                f"you have {limits.per_peer} connections open to the warden daemon, the limit "
                "for one caller; close idle ones (or share one client), or retry later"
            )
        return None


def limited(limits: ConnectionLimits, base: type[LimitedProtocol] = LimitedProtocol) -> type:
    """``base`` with ``limits`` (a listener's protocol class, for ``uvicorn.Config``)."""
    return type(f"Limited{base.__name__}", (base,), {"limits": limits})


def _peer_key(transport: asyncio.Transport) -> object:
    """Whose connection this is: ("uid", N) on a unix socket, ("addr", A) on TCP."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            return ("uid", peer_ids(sock)[1])
        except OSError:
            return ("uid", None)
    peer = transport.get_extra_info("peername")
    return ("addr", peer[0] if isinstance(peer, tuple) and peer else None)


class _Refuse:
    """An ASGI app that answers every request 503 TooManyConnectionsError and closes."""

    def __init__(self, why: str) -> None:
        self.status, self.content = api_errors.encode(TooManyConnectionsError(why))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.content)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.content})
