"""Where warden keeps its files. One place decides every path, and their modes.

Everything warden makes under ``$WARDEN_HOME`` is for root only: dirs 0700 (PRIVATE_DIR),
files 0600 (PRIVATE_FILE). QEMU runs as root for now, so it reads them all. Make dirs with
:func:`private_dir` and files with :func:`write_private` / :func:`open_private`, or restrict a
finished build output with :func:`restrict`. The one exception is the daemon's socket: when
a ``warden`` group exists, ``$WARDEN_HOME`` is 0710 and ``api/`` 0750, both group ``warden``,
and the socket 0660 (``auth/unix.py``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/warden")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
GROUP_PASS_DIR = 0o710
"""``$WARDEN_HOME`` when a group may use the daemon's socket: its members pass, never list."""
SOCKET_NAME = "warden.sock"


def private_dir(path: Path) -> Path:
    """Make ``path`` and its missing parents with mode 0700; tighten ``path`` if it exists.

    Only ``path`` itself is tightened, never an existing parent (``$WARDEN_HOME`` may be a
    dir the admin made, or even a shared one). An existing dir keeps a group-x bit (0710): that
    is how ``warden serve`` lets the daemon's group through ``$WARDEN_HOME`` to its socket
    (``auth/unix.py``), without letting it list or read anything there.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            d.mkdir(mode=PRIVATE_DIR)
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode passes the umask; say it exactly
    if not missing and (path.stat().st_mode & 0o777) not in (PRIVATE_DIR, GROUP_PASS_DIR):
        os.chmod(path, PRIVATE_DIR)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` with mode 0600 (and close-on-exec); a file that
    exists already (made by an older warden) is tightened to 0600 too."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)
    with contextlib.suppress(OSError):  # not ours to change: leave it
        os.fchmod(fd, PRIVATE_FILE)
    return fd


def fsync_dir(path: Path) -> None:
    """Make the entries of the directory ``path`` (a file just made or renamed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file + rename) with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restrict(out: Path) -> None:
    """Make a finished build output root-only: ``out`` 0700, its own files 0600.

    Sub-dirs are left as they are: a base rootfs tree keeps the guest's modes, which the
    squashfs copies (its 0700 parent keeps it from anyone but root).
    """
    os.chmod(out, PRIVATE_DIR)
    for entry in out.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, PRIVATE_FILE)


@dataclass(frozen=True)
class Paths:
    """The data dir layout under ``$WARDEN_HOME``."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("WARDEN_HOME", str(DEFAULT_HOME))).resolve())

    @property
    def cache(self) -> Path:
        """Content-addressed build artifacts: ``cache/<kind>-<hash>/``."""
        return self.home / "cache"

    @property
    def images(self) -> Path:
        """Image manifests: ``images/<name>.json``."""
        return self.home / "images"

    @property
    def api(self) -> Path:
        """The daemon's socket dir: only the socket is there, so that it alone may be opened
        to the daemon's group (``auth/unix.py``)."""
        return self.home / "api"

    @property
    def socket(self) -> Path:
        """The daemon's default unix socket, ``api/warden.sock``."""
        return self.api / SOCKET_NAME

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def vms(self) -> Path:
        """One runtime dir per live VM: ``run/vms/<id>/``."""
        return self.run / "vms"

    @property
    def paused(self) -> Path:
        """The sealed saved state of each paused VM: ``paused/<id>/`` (``vmm/pause.py``)."""
        return self.home / "paused"
