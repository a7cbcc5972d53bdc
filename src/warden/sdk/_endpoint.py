"""Where a warden daemon listens, and the credentials to reach it: one value, one place.

``unix:///path/to.sock`` (or just the path) is the local daemon, guarded by the socket's file
mode. ``https://host:port`` is a daemon's TCP listener: every request carries its API token
(``WARDEN_TOKEN``), and its self-signed certificate is pinned (``WARDEN_CA_CERT``, a copy of the
daemon's ``$WARDEN_HOME/tls/server.crt``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from warden._errors import SpecError
from warden.config import Paths

if TYPE_CHECKING:
    import ssl

    import httpx

# httpx and ssl load when a client is made: resolving an address (``warden run`` looking for
# a local daemon's socket) must not pay ~0.2 s for them (issue 8, "fast everywhere else").

ENV_HOST = "WARDEN_HOST"
ENV_TOKEN = "WARDEN_TOKEN"  # noqa: S105 - the name of a variable, not a secret
ENV_CA_CERT = "WARDEN_CA_CERT"
KEEPALIVE_EXPIRY_S = 60.0
"""How long the SDK keeps an idle connection to the daemon for its next request (httpx's
default is 5 s); less than the daemon keeps it (``server/run.py:KEEP_ALIVE_S``)."""


def default_url() -> str:
    """``$WARDEN_HOST``, else the local daemon's socket ``$WARDEN_HOME/api/warden.sock``."""
    return os.environ.get(ENV_HOST) or f"unix://{Paths.from_env().socket}"


def normalize(url: str) -> str:
    if url.startswith(("http://", "https://", "unix://")):
        return url
    if url.startswith("/"):
        return f"unix://{url}"
    raise SpecError(
        f"host {url!r} is neither unix:///path/to.sock, /path/to.sock nor https://host:port"
    )


@dataclass(frozen=True)
class Endpoint:
    """A daemon's address (normalized) and what it takes to talk to it."""

    url: str
    token: str | None = field(default=None, repr=False)
    ca_cert: str | None = None

    @classmethod
    def resolve(
        cls, url: str | None = None, *, token: str | None = None, ca_cert: str | None = None
    ) -> Endpoint:
        """Fill what is not given from ``$WARDEN_HOST``, ``$WARDEN_TOKEN``, ``$WARDEN_CA_CERT``."""
        return cls(
            normalize(url or default_url()),
            token or os.environ.get(ENV_TOKEN) or None,
            ca_cert or os.environ.get(ENV_CA_CERT) or None,
        )

    @property
    def socket_path(self) -> str | None:
        return self.url.removeprefix("unix://") if self.url.startswith("unix://") else None

    def headers(self) -> dict[str, str]:
        """What every request carries: the bearer token, if there is one."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext:
        """How to check the daemon's certificate: pinned if ``ca_cert``, else the system's."""
        import ssl

        if not self.ca_cert:
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cafile=self.ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise SpecError(
                f"cannot use {self.ca_cert} as the daemon's certificate ({exc}); set "
                f"{ENV_CA_CERT} to a copy of the daemon's $WARDEN_HOME/tls/server.crt"
            ) from None

    def _client_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "base_url": "http://warden" if self.socket_path else self.url.rstrip("/"),
            "headers": self.headers(),
        }
        if self.url.startswith("https://"):
            args["verify"] = self.ssl_context()
        return args

    def async_client(self, timeout: httpx.Timeout | float = 60.0) -> httpx.AsyncClient:
        import httpx

        uds, limits = self.socket_path, _limits()
        # No TLS on a unix socket: verify=False spares building an SSL context (~25 ms) for
        # every sandbox's client. (A transport given takes the limits; the client's are unused.)
        if uds:
            transport = httpx.AsyncHTTPTransport(uds=uds, verify=False, limits=limits)
            return httpx.AsyncClient(transport=transport, timeout=timeout, **self._client_args())
        return httpx.AsyncClient(limits=limits, timeout=timeout, **self._client_args())

    def sync_client(self, timeout: httpx.Timeout | float = 60.0) -> httpx.Client:
        import httpx

        uds, limits = self.socket_path, _limits()
        if uds:  # no TLS there
            transport = httpx.HTTPTransport(uds=uds, verify=False, limits=limits)
            return httpx.Client(transport=transport, timeout=timeout, **self._client_args())
        return httpx.Client(limits=limits, timeout=timeout, **self._client_args())

    def unreachable(self, exc: BaseException) -> str:
        """What to say when nothing (or nothing we trust) answers here."""
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return (
                f"the daemon at {self.url} has a certificate this client does not trust ({exc}); "
                f"set {ENV_CA_CERT} (or connect(ca_cert=...)) to a copy of the daemon's "
                "$WARDEN_HOME/tls/server.crt"
            )
        return (
            f"no warden daemon answers at {self.url} ({exc}). Start one with `warden serve`, or "
            f"point warden.connect(url) / ${ENV_HOST} at a running one"
        )


def _limits() -> httpx.Limits:
    import httpx

    return httpx.Limits(
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S
    )
