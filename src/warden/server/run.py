"""Run the manager's API: on its unix socket, and optionally on TCP with TLS and a token.

Both listeners serve the same app and the same :class:`~warden.server.Manager`, each wrapped in
:class:`~warden.server.auth.Authenticate`: the unix one names the caller by its peer
credentials (:class:`~warden.server.auth.PeerCredProtocol`), the TCP one by its token.
``warden serve`` (``cli/serve.py``) binds the sockets first, so a bad address fails before
anything starts.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from warden._errors import WardenError
from warden.auth.tokens import TokenStore
from warden.auth.unix import DEFAULT_GROUP, UnixRoles
from warden.config import Paths
from warden.policy.admission import AdmissionPolicy
from warden.server import connections
from warden.server.app import create_app
from warden.server.auth import (
    Authenticate,
    PeerCredProtocol,
    import_token_file,
    load_or_create_token,
)
from warden.server.manager import Manager
from warden.server.tls import ensure_cert

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10
FDS_PER_VM = 8
"""Open files the daemon holds per running VM: its QMP, agent and console sockets, console
log, transfer window and pidfd (8.2 measured, 6 VMs)."""
FD_HEADROOM = 256
"""Open files kept for the rest: the database, images, logs. Client connections take at most
half of the whole (``server/connections.py:for_open_files``)."""
KEEP_ALIVE_S = 75
"""How long an idle client connection is kept open (uvicorn's default is 5 s: a client that
paused 5 s, as a sandbox's user between two commands does, paid a new connection, about 7 ms
more on its next exec here). The SDK drops its idle connections first
(``sdk/_endpoint.py:KEEPALIVE_EXPIRY_S``), so it never sends on one the daemon is closing."""


@dataclass(frozen=True)
class TcpListener:
    sock: socket.socket
    cert: Path
    key: Path
    token: str


def listen_tcp(paths: Paths, where: str) -> TcpListener:
    """Bind ``HOST:PORT`` (``[v6]:PORT`` too), and make sure of its certificate and token."""
    host, sep, port_text = where.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise WardenError(f"--tcp {where!r} is not HOST:PORT, e.g. 127.0.0.1:8443")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port_text)))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise WardenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    try:
        cert, key = ensure_cert(paths.home, host)
        token = load_or_create_token(paths.home)
    except BaseException:
        sock.close()
        raise
    return TcpListener(sock, cert, key, token)


class _Server(uvicorn.Server):
    """One of a group of servers that stop together on SIGTERM/SIGINT (each installs its own
    handler, and only the last one installed would hear the signal)."""

    def __init__(self, config: uvicorn.Config, group: list[_Server]) -> None:
        super().__init__(config)
        self.group = group
        group.append(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for server in self.group:
            uvicorn.Server.handle_exit(server, sig, frame)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft one.

    The daemon holds :data:`FDS_PER_VM` files per VM, so the usual default soft limit of 1024
    would end it at ~120 VMs with EMFILE, every VM's requests failing with it. systemd keeps
    that soft limit for the sake of ``select()`` and asks programs that need more to raise it
    to the hard limit themselves (systemd.exec(5), ``LimitNOFILE=``); warden never uses
    ``select()`` (asyncio polls with epoll). A hard limit below what density needs is logged.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an infinite hard limit: above fs.nr_open
            log.warning("could not raise the limit on open files from %d: %s", soft, exc)
    vms = vm_room(soft)
    if vms < 256:
        log.warning(
            "the limit on open files is %d: room for about %d VMs; raise the hard limit "
            "(LimitNOFILE= in the daemon's systemd unit, or `ulimit -Hn`)",
            soft,
            vms,
        )
    return soft


def vm_room(nofile: int) -> int:
    """About how many VMs a daemon allowed ``nofile`` open files can hold: what its client
    connections (at most half) and :data:`FD_HEADROOM` leave, :data:`FDS_PER_VM` each."""
    return max(0, (nofile - nofile // 2 - FD_HEADROOM) // FDS_PER_VM)


async def serve(
    paths: Paths,
    sock: socket.socket,
    log_level: str,
    policy: AdmissionPolicy,
    listener: TcpListener | None,
    *,
    allow_root: bool = False,
    pools: dict[str, int] | None = None,
    auto_pause_s: float | None = None,
    group: str | None = DEFAULT_GROUP,
) -> None:
    limits = connections.for_open_files(raise_fd_limit())
    manager = Manager(paths, policy=policy, pools=pools, auto_pause_s=auto_pause_s)
    app = create_app(manager, allow_root=allow_root)
    tokens = TokenStore.open(paths)
    try:
        import_token_file(paths.home, tokens)
        roles = UnixRoles.default(group)
        await _serve(app, tokens, sock, listener, log_level, roles, limits)
    finally:
        tokens.close()


async def _serve(
    app: Any,
    tokens: TokenStore,
    sock: socket.socket,
    listener: TcpListener | None,
    log_level: str,
    unix_roles: UnixRoles,
    limits: connections.ConnectionLimits,
) -> None:
    common: dict[str, Any] = {
        "log_level": log_level.lower(),
        "log_config": None,  # uvicorn's loggers propagate to ours (logs.setup): one format
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "timeout_keep_alive": KEEP_ALIVE_S,
    }
    group: list[_Server] = []
    local_app = Authenticate(app, tokens, listener="unix", unix_roles=unix_roles)
    local = _Server(
        uvicorn.Config(
            local_app, lifespan="on", http=connections.limited(limits, PeerCredProtocol), **common
        ),
        group,
    )
    if listener is None:
        await local.serve(sockets=[sock])
        return
    remote = _Server(
        uvicorn.Config(
            Authenticate(app, tokens, listener="tcp"),
            http=connections.limited(limits),
            lifespan="off",  # the manager is started and stopped by the local server's
            ssl_certfile=str(listener.cert),
            ssl_keyfile=str(listener.key),
            **common,
        ),
        group,
    )

    async def serve_remote() -> None:
        while not local.started and not local.should_exit:  # after the manager has started
            await asyncio.sleep(0.02)
        if not local.should_exit:
            await remote.serve(sockets=[listener.sock])

    await asyncio.gather(local.serve(sockets=[sock]), serve_remote())
