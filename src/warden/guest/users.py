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
from warden.wire.ops import DEFAULT_USER, USER_GID, USER_HOME, USER_UID, Key, User

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


def account(args: dict[str, Any]) -> Account:
    """The account a request asks for in its ``user`` key (the unprivileged user if none)."""
    name = args.get(Key.USER, DEFAULT_USER)
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


_libc_handle: Any = None


def _libc() -> Any:
    """The C library, through ctypes (loaded on the first switch: importing ctypes is slow)."""
    global _libc_handle  # noqa: PLW0603 - loaded once
    if _libc_handle is None:
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _set_fs_ids(uid: int, gid: int) -> None:
    """This thread's filesystem ids (the uid first when going back to root: it restores the
    capabilities; the gid first when leaving root, while the thread may still change it)."""
    libc = _libc()
    if uid == 0:
        libc.setfsuid(uid)
        libc.setfsgid(gid)
    else:
        libc.setfsgid(gid)
        libc.setfsuid(uid)
    # Both return the previous id and never fail loudly: a second call tells if it took.
    if libc.setfsuid(uid) != uid or libc.setfsgid(gid) != gid:
        raise PermissionError(1, f"the agent cannot act as uid {uid} gid {gid}")


class _Switch:
    """A context manager: ``set_ids(account's uid, gid)`` for the block, then back to root."""

    __slots__ = ("_set_ids", "_switch", "account")

    def __init__(self, account: Account, set_ids: Callable[[int, int], None]) -> None:
        self.account = account
        self._set_ids = set_ids
        self._switch = account.uid != 0 and can_switch()

    def __enter__(self) -> None:
        if self._switch:
            self._set_ids(self.account.uid, self.account.gid)

    def __exit__(self, *exc: object) -> None:
        if self._switch:
            self._set_ids(0, 0)


def acting_as(account: Account) -> _Switch:
    """``with acting_as(account):`` runs this thread's file system calls as ``account``."""
    return _Switch(account, _set_fs_ids)


# Starting a command as ``user``. ``subprocess.Popen(user=, group=, extra_groups=)`` would do
# it, but CPython then forks the whole agent instead of using vfork, and a fork of the agent
# costs about 10 ms more per command under TCG (every page table copied, then a copy-on-write
# fault for each page the agent writes afterwards). Instead the exec thread takes the user's
# ids itself for the moment of the spawn, and the child inherits them through vfork:
#
#   real and effective ids := the user's, saved ids stay 0 (so the thread can switch back);
#   execve then sets the child's saved ids from its effective ids (execve(2)), so the command
#   ends with uid = euid = suid = 1000 and no capabilities, and cannot switch back;
#   the thread then restores root (allowed: its saved uid is 0).
#
# Linux keeps credentials per thread; glibc's setresuid() would change every thread of the
# agent (its "setxid" broadcast), so the raw system calls are used, on this thread only.
# Checks made in that window (the cwd, the executable's search) use the user's permissions too.
# While a thread of the agent has the user's real uid, the user may signal that thread: PID 1
# has a do-nothing handler for every signal that would end it (pid1.guard_signals), so such a
# signal does nothing. ptrace needs all three of the thread's uids to match and the agent to be
# dumpable: neither holds.
_SYS_SETRESUID = 117  # x86_64: the only architecture of warden's guests
_SYS_SETRESGID = 119


def _raw_setres(number: int, real: int, effective: int, saved: int) -> None:
    if _libc().syscall(number, real, effective, saved) != 0:
        import ctypes

        errno = ctypes.get_errno()
        reason = os.strerror(errno)
        raise PermissionError(errno, f"the agent cannot switch this thread's ids: {reason}")


def _set_thread_ids(uid: int, gid: int) -> None:
    """This thread's real and effective ids; its saved ids stay root's."""
    if uid == 0:  # the uid first: it gives back the capabilities
        _raw_setres(_SYS_SETRESUID, 0, 0, 0)
        _raw_setres(_SYS_SETRESGID, gid, gid, 0)
        return
    _raw_setres(_SYS_SETRESGID, gid, gid, 0)  # the gid first, while still root
    try:
        _raw_setres(_SYS_SETRESUID, uid, uid, 0)
    except BaseException:
        _raw_setres(_SYS_SETRESGID, 0, 0, 0)
        raise


def spawning_as(account: Account) -> _Switch:
    """``with spawning_as(account):`` a child started by this thread (vfork) runs as it."""
    return _Switch(account, _set_thread_ids)
