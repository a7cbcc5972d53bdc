"""Who may use the API over TCP: the holder of the daemon's API token.

The unix socket is guarded by its file mode (0600: the daemon's own user). The TCP listener is
reachable by anyone who can reach the port, so there every request must carry
``Authorization: Bearer <token>``, and the listener speaks only TLS (``server/tls.py``), so the
token never crosses the network in the clear. The token is made on the first ``warden serve
--tcp`` and kept in ``$WARDEN_HOME/api-token`` (mode 0600); delete it to rotate it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from warden._errors import AuthenticationError
from warden.api import errors as api_errors
from warden.config import private_dir

TOKEN_FILE = "api-token"  # noqa: S105 - a file name, not a secret


def load_or_create_token(home: Path) -> str:
    """The API token of the daemon of ``home``, made (0600) if there is none yet."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    token = secrets.token_urlsafe(32)
    if not home.exists():
        private_dir(home)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


class BearerAuth:
    """ASGI middleware: refuse (401) any request without the right bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        what = "a wrong API token" if given else "no API token"
        message = (
            f"{what}: send Authorization: Bearer <token>, the token being the "
            f"contents of the daemon's $WARDEN_HOME/{TOKEN_FILE} (WARDEN_TOKEN for the CLI/SDK)"
        )
        payload = json.dumps(api_errors.body(AuthenticationError.__name__, message)).encode()
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
