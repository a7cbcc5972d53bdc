"""The writer of the tamper-evident audit log: :class:`AuditLog`.

One process writes a log (an exclusive ``flock`` on it says which). Every record is chained to
the one before by its keyed MAC (``_format.py``); :meth:`AuditLog.append` returns only once
the record's line is on disk (``write`` + ``fdatasync``), then updates the signed head file,
so that whole records cut from the tail are found. Every ``checkpoint_every`` records, at the
first append after ``checkpoint_interval`` seconds, and on :meth:`AuditLog.close`, the log
appends a checkpoint signed with Ed25519 that commits to the last record's seq and MAC and to
the SHA-256 of every line since the checkpoint before.

After a crash (kill -9, power loss), :meth:`AuditLog.open` finds a torn last line (bytes after
the last newline: an append that never returned), moves it to ``audit/torn-<offset>-<ns>.bin``,
cuts it off and appends a ``recovered`` record that says what was cut. A head file that says
records are missing from the tail makes it append a ``log-truncated`` record (which
``verify`` reports) before it writes a new head.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from warden._errors import AuditLogError
from warden.audit._format import (
    CHECKPOINT,
    GENESIS_PREV,
    HEAD_SLOT_BYTES,
    Field,
    Head,
    Keys,
    check_fields,
    checkpoint_message,
    encode_line,
    head_path,
    head_slot,
    load_keys,
    log_dir,
    log_path,
    read_head,
    record_mac,
)
from warden.config import open_private, private_dir

SYSTEM_PRINCIPAL = "warden"
"""The principal of the records the log writes itself (open, checkpoint, recovered)."""

DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_INTERVAL_S = 300.0


@dataclass
class _Tail:
    """What :meth:`AuditLog.open` learned from the file as it found it."""

    size: int  # bytes of whole records
    seq: int
    mac: str
    prev: str  # the last record's prev: the MAC of seq - 1
    span: Any  # hashlib sha256 of the lines since the last checkpoint
    since_checkpoint: int
    torn: bytes


class AuditLog:
    """An open, appendable audit log under ``$WARDEN_HOME/audit/``. Thread-safe."""

    def __init__(
        self,
        home: Path,
        keys: Keys,
        fds: tuple[int, int],
        tail: _Tail,
        every: int,
        interval: float,
    ) -> None:
        self.home = home
        self.path = log_path(home)
        self._keys = keys
        self._fd, self._head_fd = fds
        self._size = tail.size
        self._seq = tail.seq
        self._mac = tail.mac
        self._span = tail.span
        self._since_checkpoint = tail.since_checkpoint
        self._every = every
        self._interval = interval
        self._last_checkpoint = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(
        cls,
        home: Path,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        lock_timeout: float = 0.0,
    ) -> AuditLog:
        """Open (or make) the log of ``home``; keys are made with a new log only.

        Recovers a torn tail, notes a cut tail, and appends a ``log-open`` record.
        AuditLogError if another process writes the log (after waiting up to
        ``lock_timeout`` seconds for it to close), or its keys or last record are bad.
        """
        if checkpoint_every < 1 or checkpoint_interval <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval > 0")
        home = Path(home)
        existed = log_path(home).exists() and log_path(home).stat().st_size > 0
        private_dir(log_dir(home))
        keys = load_keys(home, create=not existed)
        fd = _open_locked(log_path(home), lock_timeout)
        try:
            head_fd = open_private(head_path(home), os.O_RDWR | os.O_CREAT)
            _fsync_dir(log_dir(home))
            _fsync_dir(home)
            tail = _scan(fd, keys, log_path(home))
        except BaseException:
            os.close(fd)
            raise
        log = cls(home, keys, (fd, head_fd), tail, checkpoint_every, checkpoint_interval)
        try:
            log._start(tail, existed)
        except BaseException:
            log._release()
            raise
        return log

    def _start(self, tail: _Tail, existed: bool) -> None:
        head = read_head(head_path(self.home), self._keys.public)  # before any append
        if tail.torn:
            self._recover(tail.torn)
        if (existed or head is not None) and not _head_matches(head, tail):
            self._record_cut(head, tail)
        self.append(
            "log-open",
            principal=SYSTEM_PRINCIPAL,
            created=not existed,
            pid=os.getpid(),
            key_id=self._keys.key_id,
            mac_key_id=self._keys.mac_key_id,
        )

    # -- appending ---------------------------------------------------------------------

    def append(
        self,
        action: str,
        *,
        principal: str,
        sandbox: str | None = None,
        outcome: str = "ok",
        **fields: Field,
    ) -> dict[str, object]:
        """Append one record and return it (with its ``seq``, ``time``, ``prev`` and ``mac``)
        once it is on disk. AuditRecordError (nothing written) for a bad or too big record;
        AuditLogError if the disk failed."""
        check_fields(action, principal, outcome, fields)
        with self._lock:
            self._check_open()
            record: dict[str, Any] = {
                **fields,
                "action": action,
                "principal": principal,
                "sandbox": sandbox,
                "outcome": outcome,
            }
            done = self._append_locked(record)
            if self._due():
                self._checkpoint_locked()
        return done

    async def append_async(
        self,
        action: str,
        *,
        principal: str,
        sandbox: str | None = None,
        outcome: str = "ok",
        **fields: Field,
    ) -> dict[str, object]:
        """:meth:`append` in a worker thread: the event loop never waits on the disk."""
        call = functools.partial(
            self.append, action, principal=principal, sandbox=sandbox, outcome=outcome, **fields
        )
        return await asyncio.to_thread(call)

    def checkpoint(self) -> None:
        """Append a signed checkpoint now (nothing if no record came since the last one)."""
        with self._lock:
            self._check_open()
            if self._since_checkpoint:
                self._checkpoint_locked()

    def close(self) -> None:
        """Write a final checkpoint and release the log. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._since_checkpoint:
                    self._checkpoint_locked()
            finally:
                self._release()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- internals (called with the lock held) -------------------------------------------

    def _append_locked(self, record: dict[str, Any]) -> dict[str, object]:
        record["seq"] = self._seq + 1
        record["time"] = round(time.time(), 6)
        record["prev"] = self._mac
        if record["action"] == CHECKPOINT:
            record["sig"] = self._keys.signer.sign(checkpoint_message(record)).hex()
        record["mac"] = record_mac(self._keys.mac_key, record)
        line = encode_line(record)
        self._write(line)
        self._size += len(line)
        self._seq = record["seq"]
        self._mac = record["mac"]
        self._span.update(line)
        self._since_checkpoint += 1
        self._write_head()
        return record

    def _checkpoint_locked(self) -> None:
        self._append_locked(
            {
                "action": CHECKPOINT,
                "principal": SYSTEM_PRINCIPAL,
                "sandbox": None,
                "outcome": "ok",
                "covers": self._seq,
                "records": self._since_checkpoint,
                "span_sha256": self._span.hexdigest(),
                "key_id": self._keys.key_id,
            }
        )
        self._span = hashlib.sha256()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def _due(self) -> bool:
        if self._since_checkpoint >= self._every:
            return True
        return time.monotonic() - self._last_checkpoint >= self._interval

    def _write(self, line: bytes) -> None:
        """``line`` at the end of the log, on disk; on failure the log is cut back."""
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                os.fdatasync(self._fd)
            raise AuditLogError(
                f"cannot append to the audit log {self.path}: {exc.strerror}; the record was "
                "not written. Free disk space or fix the file system, then retry"
            ) from exc

    def _write_head(self) -> None:
        slot = head_slot(self._keys.signer, Head(self._seq, self._mac))
        try:
            os.pwrite(self._head_fd, slot, (self._seq % 2) * HEAD_SLOT_BYTES)
            os.fdatasync(self._head_fd)
        except OSError as exc:
            raise AuditLogError(
                f"record {self._seq} is in the audit log, but its head file "
                f"{head_path(self.home)} could not be written ({exc.strerror})"
            ) from exc

    def _recover(self, torn: bytes) -> None:
        """Move a torn tail aside, cut it off, and say so in a ``recovered`` record."""
        offset = self._size
        saved = log_dir(self.home) / f"torn-{offset}-{time.time_ns()}.bin"
        fd = open_private(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(saved.parent)
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self.append(
            "recovered",
            principal=SYSTEM_PRINCIPAL,
            outcome="error",
            reason="a torn last line (an append that never returned) was cut off",
            cut_offset=offset,
            cut_bytes=len(torn),
            cut_sha256=hashlib.sha256(torn).hexdigest(),
            saved_as=saved.name,
        )

    def _record_cut(self, head: Head | None, tail: _Tail) -> None:
        """The head file does not match the log's tail: say so before it is overwritten."""
        if head is None:
            reason = "the head file is missing or no slot of it is signed"
        else:
            reason = (
                f"the head file says record {head.seq} (mac {head.mac[:16]}) was written, "
                f"but the log ends at record {tail.seq}"
            )
        self.append(
            "log-truncated",
            principal=SYSTEM_PRINCIPAL,
            outcome="error",
            reason=reason + ": records may have been cut from the tail",
            head_seq=None if head is None else head.seq,
            log_seq=tail.seq,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise AuditLogError(f"the audit log {self.path} is closed")

    def _release(self) -> None:
        self._closed = True
        for fd in (self._fd, self._head_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _head_matches(head: Head | None, tail: _Tail) -> bool:
    """The head is the last record, or the one before (a crash between log and head)."""
    if head is None:
        return tail.seq <= 1  # a crash before the first head was written
    if head.seq == tail.seq:
        return head.mac == tail.mac
    return head.seq == tail.seq - 1 and head.mac == tail.prev


def _open_locked(path: Path, timeout: float) -> int:
    fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
    os.close(fd)
    raise AuditLogError(
        f"another process writes the audit log {path} (a running `warden serve`?): "
        "only one writer at a time; read it with `warden audit tail`"
    )


def _scan(fd: int, keys: Keys, path: Path) -> _Tail:
    """The log's last record, the lines since its last checkpoint and a torn tail, read from
    the end back to that checkpoint (a window that doubles), not the whole file."""
    size = os.fstat(fd).st_size
    window = _SCAN_WINDOW
    while True:
        base = max(0, size - window)
        data = os.pread(fd, size - base, base) if size else b""
        cut = data.rfind(b"\n") + 1
        first = 0 if base == 0 else data.find(b"\n") + 1  # skip a line cut by the window
        found = _lines_since_checkpoint(data[first:cut])
        if found is not None or base == 0:
            break
        window *= 2
    torn = data[cut:]
    if cut <= first:  # no whole line at all (base is 0 here)
        return _Tail(0, 0, GENESIS_PREV, GENESIS_PREV, hashlib.sha256(), 0, torn)
    whole = data[first:cut]
    since = found if found is not None else whole.count(b"\n")
    span_bytes = whole[len(whole) - _tail_len(whole, since) :]
    last = _parse_last(whole[: len(whole) - 1].rsplit(b"\n", 1)[-1], keys, path)
    span = hashlib.sha256(span_bytes)
    return _Tail(base + cut, last["seq"], last["mac"], last["prev"], span, since, torn)


_SCAN_WINDOW = 1 << 20


def _lines_since_checkpoint(whole: bytes) -> int | None:
    """How many whole lines of ``whole`` come after its last checkpoint; None if it has none."""
    lines = whole.split(b"\n")[:-1]
    for since, line in enumerate(reversed(lines)):
        if _is_checkpoint(line):
            return since
    return None


def _tail_len(whole: bytes, lines: int) -> int:
    """The byte length of the last ``lines`` lines of ``whole`` (which ends with a newline)."""
    if lines == 0:
        return 0
    end = len(whole) - 1
    pos = end
    for _ in range(lines):
        pos = whole.rfind(b"\n", 0, pos)
    return end - pos


def _parse_last(line: bytes, keys: Keys, path: Path) -> dict[str, Any]:
    try:
        record = json.loads(line)
        ok = (
            isinstance(record, dict)
            and isinstance(record.get("seq"), int)
            and isinstance(record.get("prev"), str)
            and record.get("mac") == record_mac(keys.mac_key, record)
        )
    except ValueError:
        ok = False
    if not ok:
        raise AuditLogError(
            f"the last record of the audit log {path} is not one this host's key wrote: the "
            "log was altered or its key replaced. Run `warden audit verify`; to go on, move "
            "the audit/ dir aside (a new log starts)"
        )
    return dict(record)


def _is_checkpoint(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("action") == CHECKPOINT


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
