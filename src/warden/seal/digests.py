"""SHA-256 of files, hashed once and remembered: ``$WARDEN_HOME/cache/verified.json``.

Every new process used to hash the image files again (about 104 MB, 0.1 s of each ``warden
run``), and a template's device state or a pause file adds more. A file's digest is remembered,
in the process and in a root-only record (0600, written atomically), under the file's path and
its (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns); any change to one of those hashes it
again.

Why an unchanged stat means unchanged bytes:

* Every way to change a file's bytes (write, truncate, a write through mmap, a copy onto it)
  sets its mtime *and* its ctime to now. ``utime`` can set the mtime back, but it sets the
  ctime to now as well: the ctime cannot be set back, except by setting the system clock
  (CAP_SYS_TIME) or writing the disk under the filesystem, which only root can do, and root
  owns warden, its key and this record anyway. A file put in place by rename is another
  inode, or, if its number was reused, has a ctime of its own.
* The files are root's (0600 in 0700 dirs), so only root can write them to begin with.
* Timestamps are coarse (the kernel takes them from a clock that ticks every few ms, some
  filesystems keep whole seconds), so a write right after hashing, in the same tick, would
  leave the stat unchanged. As git does for its index, a digest is only remembered when the
  hash began at least ``RACY_NS`` after the file's last change (its ctime); a file that
  changed just before it was hashed is hashed again next time.
* The record itself is root's: anyone who can write it can as well write the files, the
  image manifests and the host key. A record that does not parse is treated as empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from warden.config import open_private, private_dir

log = logging.getLogger(__name__)

RECORD_NAME = "verified.json"
RECORD_FORMAT = 1
RECORD_MAX_ENTRIES = 512
RECORD_MAX_BYTES = 1 << 20
RACY_NS = 2_000_000_000
"""A digest is remembered only if the file had not changed for this long when hashing began."""
CHUNK = 1 << 20

StatKey = tuple[str, int, int, int, int, int]
"""(path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)"""
_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")

_memo: dict[StatKey, str] = {}
_memo_lock = threading.Lock()


def stat_key(path: Path, st: os.stat_result) -> StatKey:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_fd(fd: int) -> str:
    """The SHA-256 of the whole file open at ``fd``, read with pread (the offset stays)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [view], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest()


class DigestRecord:
    """The digests of files remembered in ``<dir>/verified.json`` (and in this process)."""

    def __init__(self, directory: Path | None) -> None:
        """``directory`` holds the record; None remembers digests in this process only."""
        self.dir = directory
        self.path = directory / RECORD_NAME if directory is not None else None

    def digest(self, path: Path, fd: int) -> str:
        """The SHA-256 of ``path``, open at ``fd``: remembered if its stat is unchanged,
        else read from ``fd`` (so what was hashed is what the caller goes on to use)."""
        st = os.fstat(fd)
        key = stat_key(path, st)
        known = self.lookup(key)
        if known is not None:
            return known
        began = time.time_ns()
        digest = sha256_fd(fd)
        if began - st.st_ctime_ns >= RACY_NS:
            self.remember(key, digest)
        return digest

    def lookup(self, key: StatKey) -> str | None:
        with _memo_lock:
            known = _memo.get(key)
        if known is not None:
            return known
        entry = self._read().get(key[0])
        if entry is None or tuple(entry.get(f) for f in _FIELDS) != key[1:]:
            return None
        digest = entry.get("sha256")
        if not isinstance(digest, str):
            return None
        with _memo_lock:
            _memo[key] = digest
        return digest

    def remember(self, key: StatKey, digest: str) -> None:
        """Remember a digest (best effort: a record that cannot be written is skipped)."""
        with _memo_lock:
            _memo[key] = digest
        if self.dir is None:
            return
        entries = self._read()
        entries.pop(key[0], None)  # re-inserted last: the newest entries are the ones kept
        entries[key[0]] = {**dict(zip(_FIELDS, key[1:], strict=True)), "sha256": digest}
        kept = {p: e for p, e in entries.items() if os.path.exists(p)}  # gone: forget them
        kept = dict(list(kept.items())[-RECORD_MAX_ENTRIES:])
        try:
            self._write({"format": RECORD_FORMAT, "files": kept})
        except OSError as exc:
            log.warning("could not write %s (files are hashed again next time): %s", self.path, exc)

    def forget(self, path: Path) -> None:
        with _memo_lock:
            for key in [k for k in _memo if k[0] == str(path)]:
                del _memo[key]

    def _read(self) -> dict[str, dict[str, Any]]:
        """The record's entries; a missing, oversized or corrupt record counts as empty."""
        if self.path is None:
            return {}
        return read_record(self.path, RECORD_FORMAT, "files", RECORD_MAX_BYTES)

    def _write(self, record: dict[str, Any]) -> None:
        """Write the record atomically: a unique temp file, then rename over the old one.

        Two processes may race: the last one's record wins, and what the other remembered is
        hashed again next time. Nothing is ever wrong, only sometimes slower.
        """
        assert self.path is not None
        write_record(self.path, record)


def read_record(path: Path, fmt: int, key: str, max_bytes: int) -> dict[str, dict[str, Any]]:
    """The ``key`` entries of a private JSON record ``{"format": fmt, key: {...}}``; a
    missing, oversized or corrupt record, or one of another format, counts as empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        data = json.loads(os.read(fd, max_bytes))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("format") != fmt:
        return {}
    entries = data.get(key)
    if not isinstance(entries, dict):
        return {}
    return {str(k): v for k, v in entries.items() if isinstance(v, dict)}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write a private JSON record atomically: a unique temp file (0600) beside it, then a
    rename over the old one (the last of two racing writers wins)."""
    private_dir(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(record, sort_keys=True).encode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
