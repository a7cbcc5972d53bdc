"""``verify``: check an audit log and say where it was altered.

With the HMAC key (root, the owner of ``$WARDEN_HOME``) every record's MAC and link is
checked, so each modified, deleted, inserted or reordered record is named by its line and seq.
With only the public key (``public_only``, or a copy of ``keys/audit-sign.pub``) the signed
checkpoints and head are checked, and with them every line up to the last checkpoint as a
block: a change is found and placed between two checkpoints, and the records after the last
checkpoint are reported as unverified.

The walk follows the chain: a record whose MAC fails is *modified* when the next record still
names it as ``prev`` (its content changed after it was written) and *inserted* when the next
record skips it (a forgery); a valid record seen before is an inserted copy; a jump in seq
opens a gap that a later record of that seq fills (*reordered*) or that stays open
(*deleted*); the signed head file finds records cut from the tail (*truncated*).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from warden._errors import AuditLogError
from warden.audit._format import (
    CHECKPOINT,
    GENESIS_PREV,
    Head,
    canonical,
    check_signature,
    checkpoint_message,
    head_path,
    load_mac_key,
    load_own_public,
    load_public,
    log_path,
    mac_key_id,
    public_key_id,
    read_head,
    record_mac,
)

Kind = Literal[
    "modified",
    "deleted",
    "inserted",
    "reordered",
    "truncated",
    "torn",
    "bad-checkpoint",
    "bad-key",
]


@dataclass(frozen=True)
class Problem:
    """One finding: where (``line`` in the file, 1-based, and the record's ``seq``) and what."""

    kind: Kind
    message: str
    seq: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "log"
        if self.seq is not None:
            where += f" (seq {self.seq})"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` when there is no problem."""

    records: int = 0
    checkpoints: int = 0
    last_seq: int = 0
    mode: Literal["mac", "public"] = "mac"
    unverified_after: int | None = None
    """Public mode: records with a seq above this are covered by no checkpoint yet."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Line:
    no: int
    start: int
    raw: bytes
    rec: dict[str, Any] | None
    mac_ok: bool | None = None  # None: not checked (public mode)


def verify(
    home: Path,
    *,
    public_only: bool = False,
    public_key: Path | None = None,
    log: Path | None = None,
) -> VerifyReport:
    """Check the log under ``home`` (or the copy ``log``, with its ``head`` next to it);
    AuditLogError if there is none or no key to check it. Without the HMAC key (absent, or
    ``public_only``) only what the public key can check is checked."""
    path = log or log_path(home)
    if not path.exists():
        raise AuditLogError(f"there is no audit log at {path}")
    own = None if public_only or public_key else load_own_public(home)
    public = own or load_public(home, public_key)
    head = read_head(path.parent / "head" if log else head_path(home), public)  # head first
    try:
        data = _read_whole(path)
    except FileNotFoundError:
        raise AuditLogError(f"there is no audit log at {path}") from None
    except OSError as exc:
        raise AuditLogError(
            f"cannot read the audit log {path} ({exc.strerror}): run as the owner of "
            "$WARDEN_HOME (root), or verify a copy with --public-only"
        ) from exc
    key = None if public_only else load_mac_key(home)
    report = VerifyReport(mode="public" if key is None else "mac")
    lines = _split(data, report)
    if key is not None and _wrong_key(lines, key, report):
        key = None
        report.mode = "public"
    if key is not None:
        for ln in lines:
            ln.mac_ok = ln.rec is not None and hmac.compare_digest(
                str(ln.rec.get("mac")), record_mac(key, ln.rec)
            )
    _Walk(lines, head, report).run()
    after = _check_checkpoints(lines, data, public, report)
    _check_head(head, lines, report)
    if report.mode == "public":
        _check_head_span(head, lines, data, after, report)
    report.problems.sort(key=lambda p: (p.line or 1 << 62, p.kind))
    return report


def _read_whole(path: Path) -> bytes:
    """The log's bytes; read again (briefly) while they end in a partial line, which may be
    an append in flight rather than a torn one."""
    data = path.read_bytes()
    for _ in range(5):
        if not data or data.endswith(b"\n"):
            break
        time.sleep(0.02)
        data = path.read_bytes()
    return data


def _split(data: bytes, report: VerifyReport) -> list[_Line]:
    cut = data.rfind(b"\n") + 1
    lines: list[_Line] = []
    start = 0
    for no, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):
        lines.append(_Line(no, start, raw, _parse(raw, no, report)))
        start += len(raw) + 1
    report.records = len(lines)
    if cut < len(data):
        report.problems.append(
            Problem(
                "torn",
                f"{len(data) - cut} bytes at offset {cut} after the last newline: a torn "
                "append (the writer crashed; reopening the log moves them aside) or an edit",
                line=len(lines) + 1,
            )
        )
    return lines


def _parse(raw: bytes, no: int, report: VerifyReport) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    fields_ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("seq"), int)
        and isinstance(rec.get("prev"), str)
        and isinstance(rec.get("mac"), str)
    )
    if not isinstance(rec, dict) or not fields_ok:
        report.problems.append(Problem("modified", "not a record (unreadable JSON)", line=no))
        return None
    seq = rec["seq"]
    if canonical(rec) != raw:
        report.problems.append(
            Problem("modified", "the line is not in canonical form: it was edited", seq, no)
        )
    return rec


def _wrong_key(lines: list[_Line], key: bytes, report: VerifyReport) -> bool:
    """The first ``log-open`` record names another HMAC key: every MAC would fail."""
    first = next((ln for ln in lines if ln.rec and ln.rec.get("action") == "log-open"), None)
    if first is None or first.rec is None or first.rec.get("mac_key_id") == mac_key_id(key):
        return False
    report.problems.append(
        Problem(
            "bad-key",
            "this host's audit HMAC key is not the one the log was written with (the key "
            "was replaced, or the log comes from elsewhere): checked with the public key only",
            first.rec.get("seq"),
            first.no,
        )
    )
    return True


class _Walk:
    """Follow the chain line by line; see the module docstring for the classification."""

    def __init__(self, lines: list[_Line], head: Head | None, report: VerifyReport) -> None:
        self.lines = lines
        self.head = head
        self.report = report
        self.expect_seq = 1
        self.expect_prev: str | None = GENESIS_PREV
        self.seen: dict[str, int] = {}
        self.gaps: list[tuple[int, int, int]] = []  # (first, last seq, line where found)

    def problem(self, kind: Kind, message: str, ln: _Line) -> None:
        seq = ln.rec.get("seq") if ln.rec else None
        self.report.problems.append(Problem(kind, message, seq, ln.no))

    def run(self) -> None:
        for i, ln in enumerate(self.lines):
            if ln.rec is None:
                self.advance(None)
            elif ln.mac_ok is False:
                self.bad_mac(ln, i + 1 == len(self.lines), self.next_record(i))
            else:
                self.good(ln, ln.rec)
        for first, last, no in self.gaps:
            span = f"seq {first}" if first == last else f"seqs {first}..{last}"
            self.report.problems.append(
                Problem("deleted", f"{span} missing before this line", first, no)
            )
        self.report.last_seq = self.expect_seq - 1

    def next_record(self, i: int) -> dict[str, Any] | None:
        return self.lines[i + 1].rec if i + 1 < len(self.lines) else None

    def advance(self, mac: object) -> None:
        self.expect_seq += 1
        self.expect_prev = mac if isinstance(mac, str) else None

    def bad_mac(self, ln: _Line, last: bool, nxt: dict[str, Any] | None) -> None:
        """Modified (the next record, or the head at the tail, names it) or inserted (they
        name the record before it instead)."""
        assert ln.rec is not None
        mac = ln.rec.get("mac")
        skipped = False
        if nxt is not None:
            skipped = nxt.get("prev") != mac and nxt.get("prev") == self.expect_prev
        elif last and self.head is not None:
            skipped = self.head.mac != mac and self.head.mac == self.expect_prev
        if skipped:
            self.problem("inserted", "its MAC fails and the chain skips it: a forgery", ln)
            return
        self.problem("modified", "its MAC fails: a field was changed after it was written", ln)
        self.advance(mac)

    def good(self, ln: _Line, rec: dict[str, Any]) -> None:
        mac, seq = rec["mac"], rec["seq"]
        if mac in self.seen:
            self.problem("inserted", f"a copy of the record at line {self.seen[mac]}", ln)
            return
        self.seen[mac] = ln.no
        if seq == self.expect_seq:
            if self.expect_prev is not None and rec["prev"] != self.expect_prev:
                self.problem("modified", "it does not follow the record before it", ln)
            self.advance(mac)
        elif seq > self.expect_seq:
            self.gaps.append((self.expect_seq, seq - 1, ln.no))
            self.expect_seq = seq
            self.advance(mac)
        elif self.fill_gap(seq):
            self.problem("reordered", f"seq {seq} comes after seq {self.expect_seq - 1}", ln)
        else:
            self.problem("inserted", f"a second record with seq {seq}", ln)

    def fill_gap(self, seq: int) -> bool:
        for i, (first, last, no) in enumerate(self.gaps):
            if first <= seq <= last:
                rest = [(first, seq - 1, no), (seq + 1, last, no)]
                self.gaps[i : i + 1] = [g for g in rest if g[0] <= g[1]]
                return True
        return False


def _check_checkpoints(
    lines: list[_Line], data: bytes, public: Ed25519PublicKey, report: VerifyReport
) -> int:
    """Check every checkpoint and the span it signed; the byte offset after the last one
    that holds (0 if none)."""
    span_start, span_line = 0, 0  # byte offset and index of the first line of the span
    after = 0
    report.unverified_after = 0
    key_id = public_key_id(public)
    for i, ln in enumerate(lines):
        rec = ln.rec
        if rec is None or rec.get("action") != CHECKPOINT:
            continue
        report.checkpoints += 1
        seq = rec["seq"]
        if rec.get("key_id") != key_id:
            report.problems.append(
                Problem("bad-key", "signed by another key than keys/audit-sign.pub", seq, ln.no)
            )
        elif not check_signature(public, rec.get("sig"), checkpoint_message(rec)):
            report.problems.append(
                Problem("bad-checkpoint", "its Ed25519 signature does not hold", seq, ln.no)
            )
        else:
            _check_span(lines[span_line:i], data[span_start : ln.start], ln, report)
            report.unverified_after = seq
            after = ln.start + len(ln.raw) + 1
        span_start, span_line = ln.start + len(ln.raw) + 1, i + 1
    if report.mode == "mac" or report.unverified_after == report.last_seq:
        report.unverified_after = None
    return after


def _check_head_span(
    head: Head | None, lines: list[_Line], data: bytes, after: int, report: VerifyReport
) -> None:
    """With only the public key: the lines after the last good checkpoint, through the one
    the signed head names, must be those whose digest it signed (the writer's span)."""
    if head is None or head.span is None or report.unverified_after is None:
        return
    end = next((ln for ln in lines if ln.rec is not None and ln.rec.get("seq") == head.seq), None)
    if end is None or end.start < after:
        return  # a cut tail (_check_head says so), or a head older than the checkpoint
    if hashlib.sha256(data[after : end.start + len(end.raw) + 1]).hexdigest() != head.span:
        report.problems.append(
            Problem(
                "modified",
                "the records after the last checkpoint are not the ones the signed head "
                f"covers (through seq {head.seq})",
                head.seq,
                end.no,
            )
        )
    elif head.seq == report.last_seq:
        report.unverified_after = None


def _check_span(span: list[_Line], data: bytes, cp: _Line, report: VerifyReport) -> None:
    """The lines since the checkpoint before are the ones that this checkpoint signed."""
    assert cp.rec is not None
    intact = (
        hashlib.sha256(data).hexdigest() == cp.rec.get("span_sha256")
        and len(span) == cp.rec.get("records")
        and cp.rec.get("covers") == cp.rec["seq"] - 1
    )
    if intact:
        return
    first = span[0].no if span else cp.no
    if report.mode == "mac" and any(
        p.line is not None and first <= p.line <= cp.no for p in report.problems
    ):
        return  # already named record by record
    report.problems.append(
        Problem(
            "modified",
            f"lines {first}..{cp.no - 1} are not the ones this checkpoint signed: a record "
            "there was modified, deleted, inserted or reordered",
            cp.rec["seq"],
            cp.no,
        )
    )


def _check_head(head: Head | None, lines: list[_Line], report: VerifyReport) -> None:
    """The signed head names a record written (the last one, when the writer is quiet): it
    must still be in the log. Read before the log, so a writer busy meanwhile adds only
    records after it."""
    for ln in lines:
        if ln.rec is not None and ln.rec.get("action") == "log-truncated":
            report.problems.append(
                Problem("truncated", str(ln.rec.get("reason")), ln.rec["seq"], ln.no)
            )
    recs = [ln.rec for ln in lines if ln.rec is not None]
    if not recs:
        return
    top, end = max(int(r["seq"]) for r in recs), len(lines) + 1
    if head is None:
        if top > 1:
            report.problems.append(
                Problem("bad-checkpoint", "the head file is missing or not signed", line=end)
            )
        return
    macs = {str(r["mac"]) for r in recs if r["seq"] == head.seq}
    if head.seq > top:
        message = (
            f"records after seq {top} were cut: the signed head file says seq {head.seq} "
            "was written"
        )
    elif macs and head.mac not in macs:
        message = (
            f"record seq {head.seq} is not the one the signed head names "
            f"(mac {head.mac[:16]}…): the tail was replaced"
        )
    else:
        return
    report.problems.append(Problem("truncated", message, head.seq, end))
