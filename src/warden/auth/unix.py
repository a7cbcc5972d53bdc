"""Who is on the other end of the unix socket: the kernel says (``SO_PEERCRED``).

Each connection to the daemon's unix socket carries its peer's pid, uid and gid as the kernel
recorded them at ``connect()``, and its supplementary groups (``SO_PEERGROUPS``, Linux 4.13):
nothing the client says, so nothing it can forge. ``server.auth.PeerCredProtocol`` (uvicorn's
h11 protocol, given as ``uvicorn.Config(http=...)``) reads them once per connection and puts a
:class:`Peer` into every request's ASGI scope under :data:`PEER_KEY`; the authenticating
middleware (``server/auth.py``) turns it into a :class:`~warden.auth.principal.Principal` with
:func:`principal_for_peer`.

Roles of a unix peer (:class:`UnixRoles`, the default until ``policy.toml`` maps them): uid 0
(and the daemon's own uid) get ``admin``; a member of the daemon's group (``warden serve
--group``, default ``warden``), by primary or supplementary gid, gets ``user``; anyone else
gets no role, and is refused (401). The socket itself is ``0660 root:<group>`` when that group
exists, else ``0600``: see :func:`open_socket_dir`.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warden.auth.principal import Principal

PEER_KEY = "warden.peer"
"""Where ``server.auth.PeerCredProtocol`` leaves a connection's :class:`Peer` in the scope."""

DEFAULT_GROUP = "warden"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python lacks the name
_GROUPS_FIRST_TRY = 64


@dataclass(frozen=True)
class Peer:
    """The credentials of a unix-socket client, as the kernel recorded them at connect."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    name: str = ""
    """Its login name, looked up once per connection (a miss costs ~0.15 ms); "" if not yet."""

    @property
    def gids(self) -> frozenset[int]:
        """Its primary and supplementary groups."""
        return self.groups | {self.gid}


def peer_ids(sock: Any) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected ``AF_UNIX`` socket's peer at ``connect()``
    (``SO_PEERCRED``); :class:`OSError` if the kernel has none."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_credentials(sock: Any) -> Peer:
    """The :class:`Peer` of a connected ``AF_UNIX`` socket (a socket or asyncio's
    TransportSocket); :class:`OSError` if the kernel has none."""
    pid, uid, gid = peer_ids(sock)
    groups = _peer_groups(sock, uid, gid)
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups, name=user_name(uid))


def _peer_groups(sock: Any, uid: int, gid: int) -> frozenset[int]:
    """The peer's supplementary groups at connect (``SO_PEERGROUPS``); on a kernel without
    it, the groups its user has in the group database (``os.getgrouplist``)."""
    for count in (_GROUPS_FIRST_TRY, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno != errno.ENOPROTOOPT:
                raise
            break
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return frozenset()


def user_name(uid: int) -> str:
    """The login name of ``uid``, or ``uid:N`` when it has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def group_id(name: str) -> int | None:
    """The gid of group ``name``, or None if the host has no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass(frozen=True)
class UnixRoles:
    """The roles of a unix peer, from its uid and groups.

    ``admin_uids`` get ``admin``; a peer in a group of ``group_roles`` gets that group's
    roles (the union over its groups). The policy can build one from ``policy.toml``.
    """

    admin_uids: frozenset[int] = frozenset({0})
    group_roles: Mapping[int, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def default(cls, group: str | None = DEFAULT_GROUP) -> UnixRoles:
        """uid 0 and this process's uid are admins; members of ``group`` (if it exists) are
        users."""
        gid = group_id(group) if group else None
        return cls(
            admin_uids=frozenset({0, os.geteuid()}),
            group_roles={} if gid is None else {gid: frozenset({"user"})},
        )

    def roles_for_unix(self, uid: int, gids: Iterable[int]) -> frozenset[str]:
        if uid in self.admin_uids:
            return frozenset({"admin"})
        roles: set[str] = set()
        for gid in gids:
            roles |= self.group_roles.get(gid, frozenset())
        return frozenset(roles)


def roles_for_unix(uid: int, gids: Iterable[int]) -> frozenset[str]:
    """The default mapping (:meth:`UnixRoles.default` of the ``warden`` group)."""
    return UnixRoles.default().roles_for_unix(uid, gids)


def principal_for_peer(peer: Peer, roles: UnixRoles) -> Principal:
    """The principal of a unix peer: its login name, the roles its uid and groups give."""
    return Principal(
        name=peer.name or user_name(peer.uid),
        roles=roles.roles_for_unix(peer.uid, peer.gids),
        via="unix",
        uid=peer.uid,
    )


def open_socket_dir(directory: Path, gid: int | None) -> None:
    """Make the socket's directory, and ``$WARDEN_HOME`` above it, reachable by group ``gid``.

    With a group: ``directory`` is ``0750 root:<gid>`` and its parent (``$WARDEN_HOME``)
    ``0710 root:<gid>``: members may pass through it to the socket, but not list it, and
    every other file there stays 0600/0700 (``config.private_dir`` leaves that group-x bit
    alone). Without one: both are 0700 and the group is reset to the owner's.
    """
    parent = directory.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, mode in ((parent, 0o710), (directory, 0o750)):
        if gid is None:
            os.chown(path, -1, os.getegid())
            os.chmod(path, 0o700)
        else:
            os.chown(path, -1, gid)
            os.chmod(path, mode)
