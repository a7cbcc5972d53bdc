"""Who a request runs as: the unprivileged ``user`` (the default) or ``root``.

Commands run as the account's uid and gid with no supplementary groups. File operations run on
the agent's own threads with that account's permissions: Linux keeps the filesystem uid and gid
per thread, so :func:`acting_as` sets them with ``setfsuid``/``setfsgid`` around each file
system call and sets them back to root after. Switching the fsuid from 0 to another uid also
drops the thread's filesystem capabilities (``CAP_DAC_OVERRIDE``, ``CAP_FOWNER``, ...), so the
kernel checks permissions exactly as for that user, and a file it creates is owned by it. The
agent clears its own supplementary groups at start (:func:`clear_groups`), so no group of root
leaks into those checks.

An agent that is not root (a test on a host) cannot switch: it acts as itself for every account.
"""

from __future__ import annotations

import os

from warden.guest.args import Invalid
from warden.wire.ops import USER_GID, USER_HOME, USER_UID, Key, User

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Account:
    """A guest account: its name, ids and home (the default cwd of its commands)."""

    __slots__ = ("gid", "home", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def env(self) -> dict[str, str]:
        """The variables of a command's default environment that name this account."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


ROOT = Account(User.ROOT, 0, 0, "/root")
USER = Account(User.USER, USER_UID, USER_GID, USER_HOME)


def set_user_home(home: str) -> None:
    """Give ``user`` another home (tests on a host that has no /home/user)."""
    USER.home = home


def account(args: dict[str, Any], default: str) -> Account:
    """The account a request asks for in its ``user`` key (``default`` when absent)."""
    name = args.get(Key.USER, default)
    if name == User.USER:
        return USER
    if name == User.ROOT:
        return ROOT
    raise Invalid(f"'user' must be {User.USER!r} or {User.ROOT!r}, not {name!r}")


def can_switch() -> bool:
    return os.geteuid() == 0


def clear_groups() -> None:
    """Drop the agent's supplementary groups (root only)."""
    if can_switch():
        os.setgroups([])


_fs_calls: tuple[Callable[[int], int], Callable[[int], int]] | None = None


def _setfs() -> tuple[Callable[[int], int], Callable[[int], int]]:
    global _fs_calls  # noqa: PLW0603 - loaded once, on the first switch (ctypes is slow)
    if _fs_calls is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _fs_calls = (libc.setfsuid, libc.setfsgid)
    return _fs_calls


def _set_fs_ids(uid: int, gid: int) -> None:
    setfsuid, setfsgid = _setfs()
    if uid == 0:  # back to root: the uid first, which restores the capabilities
        setfsuid(uid)
        setfsgid(gid)
    else:
        setfsgid(gid)
        setfsuid(uid)
    # Both return the previous id and never fail loudly: a second call tells if it took.
    if setfsuid(uid) != uid or setfsgid(gid) != gid:
        raise PermissionError(1, f"the agent cannot act as uid {uid} gid {gid}")


class FsSwitch:
    """A context manager: the block's file system calls use ``account``'s permissions."""

    __slots__ = ("_switch", "account")

    def __init__(self, account: Account) -> None:
        self.account = account
        self._switch = account.uid != 0 and can_switch()

    def __enter__(self) -> None:
        if self._switch:
            _set_fs_ids(self.account.uid, self.account.gid)

    def __exit__(self, *exc: object) -> None:
        if self._switch:
            _set_fs_ids(0, 0)


def acting_as(account: Account) -> FsSwitch:
    """``with acting_as(account):`` runs this thread's file system calls as ``account``."""
    return FsSwitch(account)


def popen_ids(account: Account) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that run the child as ``account``."""
    if not can_switch():
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}
