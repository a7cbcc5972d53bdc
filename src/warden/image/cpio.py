"""A deterministic writer of cpio "newc" archives, the format the Linux kernel unpacks as initramfs.

Entries are collected first and written in sorted path order by :meth:`CpioWriter.trailer`, so
the same set of entries always gives the same bytes: every entry has the same mtime, uid and
gid, inode numbers are assigned in output order, and missing parent directories are added with
mode 0755. No compression: the kernel unpacks a plain newc archive fastest.

Layout of one entry (all numbers are 8 ASCII hex digits)::

    "070701" ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
    namesize check | name NUL | pad to 4 | data | pad to 4
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO, Literal

MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
HEADER_SIZE = 110
BLOCK = 512
_CHUNK = 1 << 20


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def normalize_path(path: str) -> str:
    """Return ``path`` as an archive member name: relative, no ``.``/``..``/empty parts."""
    raw = path.strip("/")
    if not raw:
        raise ValueError(f"cpio: empty member path {path!r}")
    parts = raw.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"cpio: member path {path!r} must be a plain relative path")
    if "\0" in raw:
        raise ValueError(f"cpio: member path {path!r} contains NUL")
    return raw


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes | None = None
    source: Path | None = None
    size: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    implicit: bool = False


class CpioWriter:
    """Collects entries, then writes a newc archive to ``stream`` on :meth:`trailer`.

    Use as a context manager (the trailer is written on a clean exit) or call
    :meth:`trailer` once yourself.
    """

    def __init__(self, stream: BinaryIO, *, mtime: int = 0, uid: int = 0, gid: int = 0) -> None:
        self._stream = stream
        self._mtime = mtime
        self._uid = uid
        self._gid = gid
        self._entries: dict[str, _Entry] = {}
        self._done = False

    # -- adding entries ----------------------------------------------------------------------

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory. Adding a directory that exists already only updates its mode."""
        name = normalize_path(path)
        old = self._entries.get(name)
        if old is not None and not stat.S_ISDIR(old.mode):
            raise ValueError(f"cpio: {name!r} already added as a non-directory")
        self._ensure_parents(name)
        self._entries[name] = _Entry(name, stat.S_IFDIR | (mode & 0o7777))

    def add_file(
        self,
        path: str,
        data: bytes | None = None,
        *,
        source: Path | None = None,
        mode: int = 0o644,
    ) -> None:
        """Add a regular file, either from ``data`` or read from ``source`` when written."""
        if (data is None) == (source is None):
            raise ValueError("cpio: give exactly one of data or source")
        if source is not None:
            size = source.stat().st_size
        else:
            assert data is not None
            size = len(data)
        self._add(_Entry(normalize_path(path), stat.S_IFREG | (mode & 0o7777), data, source, size))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link pointing at ``target`` (stored as the link's data)."""
        if not target or "\0" in target:
            raise ValueError(f"cpio: bad symlink target {target!r}")
        data = target.encode()
        self._add(_Entry(normalize_path(path), stat.S_IFLNK | 0o777, data, None, len(data)))

    def add_device(
        self,
        path: str,
        kind: Literal["c", "b"],
        major: int,
        minor: int,
        mode: int = 0o600,
    ) -> None:
        """Add a character (``"c"``) or block (``"b"``) device node."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._add(
            _Entry(normalize_path(path), fmt | (mode & 0o7777), rdev_major=major, rdev_minor=minor)
        )

    def _add(self, entry: _Entry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"cpio: {entry.name!r} added twice")
        self._ensure_parents(entry.name)
        self._entries[entry.name] = entry

    def _ensure_parents(self, name: str) -> None:
        if self._done:
            raise ValueError("cpio: archive already finished")
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            key = str(parent)
            old = self._entries.get(key)
            if old is None:
                self._entries[key] = _Entry(key, stat.S_IFDIR | 0o755, implicit=True)
            elif not stat.S_ISDIR(old.mode):
                raise ValueError(f"cpio: {key!r} is not a directory but has children")

    # -- writing -----------------------------------------------------------------------------

    def _header(self, ino: int, mode: int, nlink: int, size: int, name: bytes, e: _Entry) -> bytes:
        fields = (
            ino,
            mode,
            self._uid,
            self._gid,
            nlink,
            self._mtime,
            size,
            0,  # devmajor
            0,  # devminor
            e.rdev_major,
            e.rdev_minor,
            len(name) + 1,
            0,  # check
        )
        head = MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
        return head + b"\0" * _pad4(len(head))

    def trailer(self) -> int:
        """Write every entry in sorted order, then the trailer. Returns the archive size."""
        if self._done:
            raise ValueError("cpio: archive already finished")
        self._done = True
        written = 0
        out = self._stream
        for ino, name in enumerate(sorted(self._entries), start=1):
            e = self._entries[name]
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            head = self._header(ino, e.mode, nlink, e.size, name.encode(), e)
            out.write(head)
            written += len(head)
            written += self._write_data(e)
        end = _Entry(TRAILER_NAME, 0)
        head = self._header(0, 0, 1, 0, TRAILER_NAME.encode(), end)
        out.write(head)
        written += len(head)
        tail = (BLOCK - written % BLOCK) % BLOCK
        out.write(b"\0" * tail)
        return written + tail

    def _write_data(self, e: _Entry) -> int:
        if e.data is not None:
            self._stream.write(e.data)
            n = len(e.data)
        elif e.source is not None:
            n = 0
            with e.source.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    self._stream.write(chunk)
                    n += len(chunk)
            if n != e.size:
                raise ValueError(f"cpio: {e.source} changed size while being archived")
        else:
            return 0
        pad = _pad4(n)
        self._stream.write(b"\0" * pad)
        return n + pad

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._done:
            self.trailer()
