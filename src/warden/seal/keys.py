"""Host secrets under ``$WARDEN_HOME/keys/``: the sealing key today, per-VM secrets later.

::

    keys/                 0700
    keys/seal.key         0600, 32 random bytes: authenticates what a QEMU loads (seal.py)
    keys/<ns>/<name>.key  0600, e.g. one VM's channel secret (a namespace dir is 0700 too)

A secret is only ever read from its file by warden, never passed on a command line, in an
environment or in a log. A key is made on first use, atomically: the random bytes go to a
private temp file (``O_EXCL``, fsynced) that is then hard-linked to the key's name; ``link``
fails if the name exists, so two processes racing to make a key agree on the first one, a
reader never sees a half-written key, and a key that exists is never made again.

A key file that is not a regular file of ours, is readable or writable by anyone but its
owner, or has the wrong length is refused: it may have leaked or been planted. Delete it and
warden makes a new one (for the sealing key: every boot template is then made again once).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

from warden._errors import HostError
from warden.config import Paths, fsync_dir, open_private, private_dir

KEY_BYTES = 32
KEY_SUFFIX = ".key"
_PART = r"[a-z0-9][a-z0-9_-]{0,63}"
NAME_RE = re.compile(rf"^{_PART}(?:/{_PART})?$")
"""``name`` or ``namespace/name``: no dots, so no ``..`` and no hidden temp names."""


class KeyStoreError(HostError):
    """A key file is unsafe or unreadable; the message says how to fix it."""


class KeyStore:
    """Named 32-byte secrets, each in its own 0600 file under ``$WARDEN_HOME/keys/``."""

    def __init__(self, paths: Paths) -> None:
        self.root = paths.home / "keys"

    def path(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid key name (want {NAME_RE.pattern})")
        return self.root / f"{name}{KEY_SUFFIX}"

    def get(self, name: str) -> bytes | None:
        """The secret called ``name``, or None if there is none. KeyStoreError if unsafe."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unsafe(path, f"cannot be opened ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            _check_mode(path, st)
            data = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) != KEY_BYTES:
            raise _unsafe(path, f"holds {len(data)} bytes, not {KEY_BYTES}")
        return data

    def ensure(self, name: str) -> bytes:
        """The secret called ``name``; made (random, atomically) if there is none yet."""
        existing = self.get(name)
        if existing is not None:
            return existing
        secret = secrets.token_bytes(KEY_BYTES)
        if self._write(name, secret, replace=False):
            return secret
        made = self.get(name)  # another process made it first: use theirs
        if made is None:
            raise _unsafe(self.path(name), "vanished while it was being made")
        return made

    def put(self, name: str, secret: bytes) -> None:
        """Set ``name`` to ``secret``, replacing an old one atomically (e.g. re-keying a VM)."""
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a secret is {KEY_BYTES} bytes, not {len(secret)}")
        self._write(name, secret, replace=True)

    def delete(self, name: str) -> None:
        path = self.path(name)
        path.unlink(missing_ok=True)
        if "/" in name:
            with contextlib.suppress(OSError):  # not empty: other secrets live there
                path.parent.rmdir()

    def _write(self, name: str, secret: bytes, *, replace: bool) -> bool:
        """Write ``secret`` as ``name``; False if it exists and ``replace`` is off."""
        path = self.path(name)
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            fsync_dir(path.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)


def _check_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _unsafe(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise _unsafe(path, f"belongs to uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        raise _unsafe(
            path, f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600: others may have read it"
        )


def _unsafe(path: Path, problem: str) -> KeyStoreError:
    return KeyStoreError(
        f"the key file {path} {problem}; delete it, and warden makes a new one on next use"
    )
