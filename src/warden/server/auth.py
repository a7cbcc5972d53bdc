"""Who sent a request: every request gets a :class:`~warden.auth.principal.Principal`.

:class:`Authenticate` wraps the API app on each listener and puts the caller's principal into
the ASGI scope (``principal.SCOPE_KEY``), where routes and the policy read it with
``principal_of``. It never decides what the caller may do; it refuses (401, ``WWW-Authenticate:
Bearer``, the error body of an :class:`~warden.AuthenticationError`: ``api/errors.py``) only a
caller it cannot name:

- **TCP** (``listener="tcp"``, TLS only: ``server/tls.py``): every request carries
  ``Authorization: Bearer <token>``, a token of ``auth/tokens.py``, looked up on every request
  (a revoked token fails on its next one). Missing, invalid, expired and revoked get their own
  message; none says which token ids exist.
- **Unix socket** (``listener="unix"``): the caller is its peer's uid and groups, which the
  kernel gives (:class:`PeerCredProtocol`, ``auth/unix.py``); a peer with no role (not root,
  not in the daemon's group) is refused. A request that carries a bearer token is that
  token's principal instead (checked as over TCP): root can act as a token's principal, and
  a group member who holds a token can use its roles.

The daemon's older single token stays in ``$WARDEN_HOME/api-token`` (0600, made on the first
``warden serve --tcp``); the daemon imports it into the token store at start as a token of the
principal ``admin`` (``TokenStore.import_api_token``), so existing clients keep working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from warden._errors import AuthenticationError, WardenError
from warden.api import errors as api_errors
from warden.auth.principal import SCOPE_KEY, Principal
from warden.auth.tokens import TOUCH_EVERY_S, TokenStore
from warden.auth.unix import PEER_KEY, Peer, UnixRoles, peer_credentials, principal_for_peer
from warden.config import private_dir
from warden.server.connections import LimitedProtocol

TOKEN_FILE = "api-token"  # noqa: S105 - a file name, not a secret

log = logging.getLogger("warden.auth")


def load_or_create_token(home: Path) -> str:
    """The API token of the daemon of ``home``, made (0600) if there is none yet."""
    token = read_token_file(home)
    if token:
        return token
    token = secrets.token_urlsafe(32)
    if not home.exists():
        private_dir(home)
    path = home / TOKEN_FILE
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def read_token_file(home: Path) -> str:
    """The contents of ``$WARDEN_HOME/api-token``, or "" if there is none."""
    try:
        return (home / TOKEN_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""


def import_token_file(home: Path, tokens: TokenStore) -> None:
    """Make the legacy ``api-token`` (if there is one) a token of principal ``admin``."""
    text = read_token_file(home)
    if text and tokens.import_api_token(text) is not None:
        log.info("imported %s/%s as a token of principal admin", home, TOKEN_FILE)


class PeerCredProtocol(LimitedProtocol):
    """uvicorn's h11 protocol with the bounds on connections (``server/connections.py``), plus
    the peer's credentials (``auth/unix.Peer``) in every request's scope, under ``PEER_KEY``
    (``uvicorn.Config(http=PeerCredProtocol)``).

    They are read once, when the connection is made (the kernel keeps those of ``connect()``;
    a peer cannot change them afterwards), and this connection's app is wrapped to add them to
    each scope. A connection whose credentials cannot be read gets none, and
    :class:`Authenticate` refuses its requests.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("cannot read a unix peer's credentials: %s", exc)
            return
        self.app = _WithPeer(self.app, peer)


class _WithPeer:
    """An ASGI app: ``app`` with a connection's :class:`Peer` added to each scope."""

    def __init__(self, app: Any, peer: Peer) -> None:
        self.app = app
        self.peer = peer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[PEER_KEY] = self.peer
        await self.app(scope, receive, send)


class Authenticate:
    """ASGI middleware: the request's principal into ``scope[SCOPE_KEY]``, or a 401.

    ``unix_roles`` maps a unix peer to roles; it may be replaced while the daemon runs (a
    policy reload)."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenStore,
        *,
        listener: Literal["unix", "tcp"],
        unix_roles: UnixRoles | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.listener = listener
        self.unix_roles = unix_roles or UnixRoles.default()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = _authorization(scope)
        try:
            if self.listener == "tcp" or header is not None:
                principal = await self._by_token(header)
            else:
                principal = self._by_peer(scope.get(PEER_KEY))
        except AuthenticationError as exc:
            await _refuse(scope, send, exc)
            return
        scope[SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    async def _by_token(self, header: str | None) -> Principal:
        scheme, _, text = (header or "").strip().partition(" ")
        if header is not None and scheme.lower() != "bearer":
            raise AuthenticationError(
                "invalid Authorization header: send Authorization: Bearer <token>"
            )
        info = self.tokens.authenticate(text.strip() or None)
        if info.last_used is None or info.last_used < time.time() - TOUCH_EVERY_S:
            try:
                await asyncio.to_thread(self.tokens.touch, info.id)
            except WardenError as exc:  # a busy database must not fail the request
                log.warning("could not record the use of token %s: %s", info.id, exc)
        return Principal(name=info.name, roles=info.roles, via="token", token_id=info.id)

    def _by_peer(self, peer: Any) -> Principal:
        if not isinstance(peer, Peer):
            raise AuthenticationError(
                "the daemon could not read this connection's peer credentials: connect to "
                "its unix socket, or send a bearer token"
            )
        principal = principal_for_peer(peer, self.unix_roles)
        if not principal.roles:
            raise AuthenticationError(
                f"{principal.name} (uid {peer.uid}) has no role on this daemon: ask its admin "
                "to add you to the daemon's group (warden serve --group), or use a token"
            )
        return principal


def _authorization(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            return bytes(value).decode("latin-1")
    return None


async def _refuse(scope: Scope, send: Send, exc: AuthenticationError) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    payload = json.dumps(api_errors.body_of(exc)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
