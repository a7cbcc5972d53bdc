"""The writer of the tamper-evident audit log: :class:`AuditLog`.

One process writes a log (an exclusive ``flock`` on it says which). Every record is chained to
the one before by its keyed MAC (``_format.py``); :meth:`AuditLog.append` returns only once
the record's line is on disk (``write`` + ``fdatasync``), then updates the signed head file,
so that whole records cut from the tail are found; concurrent appends share one write and its
syncs (group commit). Every ``checkpoint_every`` records, at the
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
from warden.config import fsync_dir, open_private, private_dir

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


@dataclass
class _Chain:
    """Where the chain is: after the last record made (the tip) or after the last on disk."""

    seq: int
    mac: str
    size: int
    span: Any  # hashlib sha256 of the lines since the last checkpoint
    since_checkpoint: int

    def copy(self) -> _Chain:
        return _Chain(self.seq, self.mac, self.size, self.span.copy(), self.since_checkpoint)


class AuditLog:
    """An open, appendable audit log under ``$WARDEN_HOME/audit/``. Thread-safe.

    Appends commit in groups: a thread makes its record (seq, prev, MAC) under the lock and
    queues its line; the first waiting thread writes every queued line at once, syncs, writes
    the head, and wakes the others. A failed write cuts the file back and fails every record
    queued with it (they chain onto each other); the chain goes on from the last one on disk.
    """

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
        self._disk = _Chain(tail.seq, tail.mac, tail.size, tail.span, tail.since_checkpoint)
        self._tip = self._disk.copy()
        self._pending: list[bytes] = []
        self._flushing = False
        self._generation = 0  # bumped when a group fails: its records, and later ones, fail
        self._failure: AuditLogError | None = None
        self._head_slot = 0
        self._every = every
        self._interval = interval
        self._last_checkpoint = time.monotonic()
        self._cond = threading.Condition()
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
        head_fd = -1
        try:
            head_fd = open_private(head_path(home), os.O_RDWR | os.O_CREAT)
            fsync_dir(log_dir(home))
            fsync_dir(home)
            tail = _scan(fd, keys, log_path(home))
        except BaseException:
            for opened in (fd, head_fd):
                if opened >= 0:
                    os.close(opened)
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
        if (existed or head is not None) and not _head_matches(head, tail, self._fd):
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
        AuditLogError if the disk failed (the record is not in the log)."""
        check_fields(action, principal, outcome, fields)
        with self._cond:
            self._check_open()
            record: dict[str, Any] = {
                **fields,
                "action": action,
                "principal": principal,
                "sandbox": sandbox,
                "outcome": outcome,
            }
            done = self._enqueue(record)
            if self._due():
                self._enqueue_checkpoint()
            self._commit(done["seq"])
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
        with self._cond:
            self._check_open()
            if self._tip.since_checkpoint:
                self._enqueue_checkpoint()
                self._commit(self._tip.seq)

    def close(self) -> None:
        """Write a final checkpoint and release the log. Idempotent."""
        with self._cond:
            if self._closed:
                return
            try:
                if self._tip.since_checkpoint:
                    self._enqueue_checkpoint()
                if self._tip.seq > self._disk.seq:
                    self._commit(self._tip.seq)
            finally:
                while self._flushing:
                    self._cond.wait()
                self._release()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        """The seq of the last record on disk."""
        return self._disk.seq

    # -- internals (called with the lock held) -------------------------------------------

    def _enqueue(self, record: dict[str, Any]) -> dict[str, Any]:
        """Give ``record`` its place in the chain and queue its line (nothing on disk yet)."""
        tip = self._tip
        record["seq"] = tip.seq + 1
        record["time"] = round(time.time(), 6)
        record["prev"] = tip.mac
        if record["action"] == CHECKPOINT:
            record["sig"] = self._keys.signer.sign(checkpoint_message(record)).hex()
        record["mac"] = record_mac(self._keys.mac_key, record)
        line = encode_line(record)  # too big: refused before the chain moves
        self._pending.append(line)
        tip.seq, tip.mac, tip.size = record["seq"], record["mac"], tip.size + len(line)
        tip.span.update(line)
        tip.since_checkpoint += 1
        return record

    def _enqueue_checkpoint(self) -> None:
        tip = self._tip
        self._enqueue(
            {
                "action": CHECKPOINT,
                "principal": SYSTEM_PRINCIPAL,
                "sandbox": None,
                "outcome": "ok",
                "covers": tip.seq,
                "records": tip.since_checkpoint,
                "span_sha256": tip.span.hexdigest(),
                "key_id": self._keys.key_id,
            }
        )
        tip.span = hashlib.sha256()
        tip.since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def _due(self) -> bool:
        if self._tip.since_checkpoint >= self._every:
            return True
        return time.monotonic() - self._last_checkpoint >= self._interval

    def _commit(self, seq: int) -> None:
        """Return once record ``seq`` (queued in this generation) is on disk; write the queue
        if no other thread is writing it."""
        generation = self._generation
        while True:
            if self._generation != generation:
                raise AuditLogError(
                    f"record {seq} was not written to the audit log {self.path}: {self._failure}"
                )
            if self._disk.seq >= seq:
                return
            if not self._flushing:
                self._flush()
            else:
                self._cond.wait()

    def _flush(self) -> None:
        """Write the queue as one group; the lock is let go during the disk I/O."""
        self._flushing = True
        batch, self._pending = b"".join(self._pending), []
        end, start = self._tip.copy(), self._disk.size
        error: AuditLogError | None = AuditLogError("the write was interrupted")
        head_error: AuditLogError | None = None
        self._cond.release()
        try:
            self._write(batch, start)
            error = None
            head_error = self._write_head(Head(end.seq, end.mac, end.span.hexdigest()))
        except AuditLogError as exc:
            error = exc
        finally:
            self._cond.acquire()
            self._settle(end, error)
        if head_error is not None:
            raise head_error

    def _settle(self, end: _Chain, error: AuditLogError | None) -> None:
        self._flushing = False
        if error is None:
            self._disk = end
        else:  # every queued record chains onto the failed ones: fail them all
            self._generation += 1
            self._failure = error
            self._pending = []
            self._tip = self._disk.copy()
        self._cond.notify_all()

    def _write(self, data: bytes, start: int) -> None:
        """``data`` at the end of the log (at ``start``), on disk; on failure it is cut back."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
                os.fdatasync(self._fd)
            if not isinstance(exc, OSError):
                raise
            raise AuditLogError(
                f"cannot append to the audit log {self.path}: {exc.strerror}; the record was "
                "not written. Free disk space or fix the file system, then retry"
            ) from exc

    def _write_head(self, head: Head) -> AuditLogError | None:
        """The head names the last record on disk, in the slot the last write did not use
        (a torn slot leaves the other). An error is returned: the records are on disk."""
        slot = head_slot(self._keys.signer, head)
        try:
            os.pwrite(self._head_fd, slot, self._head_slot * HEAD_SLOT_BYTES)
            os.fdatasync(self._head_fd)
        except OSError as exc:
            return AuditLogError(
                f"record {head.seq} is in the audit log, but its head file "
                f"{head_path(self.home)} could not be written ({exc.strerror})"
            )
        self._head_slot ^= 1
        return None

    def _recover(self, torn: bytes) -> None:
        """Move a torn tail aside, cut it off, and say so in a ``recovered`` record."""
        offset = self._disk.size
        saved = log_dir(self.home) / f"torn-{offset}-{time.time_ns()}.bin"
        fd = open_private(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(saved.parent)
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


def _head_matches(head: Head | None, tail: _Tail, fd: int) -> bool:
    """The head names a record that is in the log: the last one, or one before it (the
    writer crashed between a group's write and its head's, or the head slot it was writing
    is torn and the other names the group before)."""
    if head is None:
        return tail.seq <= 1  # a crash before the first head was written
    if head.seq == tail.seq:
        return head.mac == tail.mac
    return head.seq < tail.seq and _mac_at(fd, tail.size, head.seq) == head.mac


def _mac_at(fd: int, size: int, seq: int) -> str | None:
    """The MAC of record ``seq``, searched from the end of the log back (a doubling window)."""
    window = _SCAN_WINDOW
    while True:
        base = max(0, size - window)
        data = os.pread(fd, size - base, base)
        first = 0 if base == 0 else data.find(b"\n") + 1
        for line in reversed(data[first:].split(b"\n")):
            rec = _parse(line)
            got = rec.get("seq") if rec else None
            if isinstance(got, int) and got <= seq:
                return str(rec.get("mac")) if rec and got == seq else None
        if base == 0:
            return None
        window *= 2


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


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _is_checkpoint(line: bytes) -> bool:
    record = _parse(line)
    return record is not None and record.get("action") == CHECKPOINT
