"""The audit log against an attacker who can write its file but does not hold its keys, and
against a writer killed with SIGKILL (issue 9, "Audit tampering" and "Crash").

Every test works on a real log on disk, written by :class:`AuditLog`, then edited the way an
attacker would (or cut the way a crash does), and checks that ``verify`` names the kind of
change and the line/seq where it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warden._errors import AuditLogError
from warden.audit import AuditLog, verify
from warden.audit._format import MAC_DOMAIN, canonical
from warden.audit.verify import Problem, VerifyReport

N = 20  # exec records; with log-open and checkpoints every 5 the file has 25 lines


def _make(home: Path, n: int = N, every: int = 5) -> None:
    with AuditLog.open(home, checkpoint_every=every) as log:
        for i in range(n):
            log.append(
                "exec",
                principal="alice" if i % 2 else "bob",
                sandbox=f"sb{i % 3}",
                argv_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                user="user",
                exit_code=i % 4,
                duration_s=0.01 * i,
            )


def _lines(home: Path) -> list[bytes]:
    return (home / "audit" / "audit.log").read_bytes().splitlines(keepends=True)


def _write(home: Path, lines: list[bytes]) -> None:
    (home / "audit" / "audit.log").write_bytes(b"".join(lines))


def _rec(line: bytes) -> dict[str, Any]:
    rec = json.loads(line)
    assert isinstance(rec, dict)
    return rec


def _index(lines: list[bytes], seq: int) -> int:
    return next(i for i, ln in enumerate(lines) if _rec(ln)["seq"] == seq)


def _found(
    report: VerifyReport, kind: str, *, seq: int | None = None, line: int | None = None
) -> Problem:
    for p in report.problems:
        if p.kind == kind and (seq is None or p.seq == seq) and (line is None or p.line == line):
            return p
    raise AssertionError(f"no {kind} problem at seq {seq} line {line}: {report.problems}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    _make(tmp_path)
    return tmp_path


def test_an_intact_log_verifies_with_the_key_and_with_the_public_key(home: Path) -> None:
    report = verify(home)
    assert report.ok, report.problems
    assert report.records == len(_lines(home)) == report.last_seq
    assert report.checkpoints >= 4 and report.mode == "mac"
    public = verify(home, public_only=True)
    assert public.ok and public.mode == "public" and public.unverified_after is None


def test_a_modified_field_is_found_at_its_record(home: Path) -> None:
    lines = _lines(home)
    i = _index(lines, 8)
    rec = _rec(lines[i])
    rec["exit_code"] = 0 if rec["exit_code"] else 1
    lines[i] = canonical(rec) + b"\n"
    _write(home, lines)
    report = verify(home)
    p = _found(report, "modified", seq=8, line=i + 1)
    assert "MAC" in p.message
    assert [x.kind for x in report.problems] == ["modified"]
    # without the HMAC key, the signed checkpoint after it still finds the change
    public = verify(home, public_only=True)
    assert not public.ok and public.problems[0].kind == "modified"
    assert public.problems[0].line is not None and public.problems[0].line > i + 1


def test_an_edit_that_keeps_the_json_valid_but_not_canonical_is_found(home: Path) -> None:
    lines = _lines(home)
    i = _index(lines, 4)
    lines[i] = lines[i].replace(b'"outcome":"ok"', b'"outcome": "ok"')
    _write(home, lines)
    _found(verify(home), "modified", seq=4, line=i + 1)


def test_a_deleted_record_is_found_where_it_was(home: Path) -> None:
    lines = _lines(home)
    i = _index(lines, 9)
    del lines[i]
    _write(home, lines)
    report = verify(home)
    p = _found(report, "deleted", seq=9, line=i + 1)
    assert "seq 9" in p.message
    assert {x.kind for x in report.problems} == {"deleted"}


def test_a_forged_record_under_another_key_is_found_as_inserted(home: Path) -> None:
    lines = _lines(home)
    i = _index(lines, 7)
    before = _rec(lines[i])
    forged: dict[str, Any] = {
        "seq": 8,
        "time": before["time"],
        "action": "exec",
        "principal": "mallory",
        "sandbox": "sb1",
        "outcome": "ok",
        "prev": before["mac"],
        "exit_code": 0,
    }
    key = secrets.token_bytes(32)
    forged["mac"] = hmac.new(key, MAC_DOMAIN + canonical(forged), hashlib.sha256).hexdigest()
    lines.insert(i + 1, canonical(forged) + b"\n")
    _write(home, lines)
    report = verify(home)
    _found(report, "inserted", seq=8, line=i + 2)
    assert {x.kind for x in report.problems} == {"inserted"}


def test_a_copy_of_a_real_record_is_found_as_inserted(home: Path) -> None:
    lines = _lines(home)
    src, at = _index(lines, 5), _index(lines, 12)
    lines.insert(at, lines[src])
    _write(home, lines)
    report = verify(home)
    p = _found(report, "inserted", seq=5, line=at + 1)
    assert f"line {src + 1}" in p.message
    assert {x.kind for x in report.problems} == {"inserted"}


def test_two_swapped_records_are_found_as_reordered(home: Path) -> None:
    lines = _lines(home)
    i, j = _index(lines, 10), _index(lines, 11)
    lines[i], lines[j] = lines[j], lines[i]
    _write(home, lines)
    report = verify(home)
    _found(report, "reordered", seq=10, line=j + 1)
    assert {x.kind for x in report.problems} == {"reordered"}


def test_whole_records_cut_from_the_tail_are_found_as_truncated(home: Path) -> None:
    lines = _lines(home)
    _write(home, lines[:-3])
    report = verify(home)
    p = _found(report, "truncated", seq=len(lines), line=len(lines) - 2)
    assert f"seq {len(lines) - 3}" in p.message
    assert not verify(home, public_only=True).ok  # the head is signed: no key needed


def test_a_tail_replaced_by_a_record_of_the_same_length_is_found(home: Path) -> None:
    lines = _lines(home)
    lines[-1] = lines[-3]  # the last record replaced by an older valid one
    _write(home, lines)
    kinds = {p.kind for p in verify(home).problems}
    assert "inserted" in kinds and "truncated" in kinds


def test_a_torn_last_line_is_found_and_recovery_leaves_a_log_that_verifies(home: Path) -> None:
    lines = _lines(home)
    torn = b'{"action":"exec","argv_sha256":"12'
    _write(home, [*lines, torn])
    report = verify(home)
    p = _found(report, "torn", line=len(lines) + 1)
    assert f"{len(torn)} bytes" in p.message
    with AuditLog.open(home) as log:
        log.append("exec", principal="alice", exit_code=0)
    report = verify(home)
    assert report.ok, report.problems
    recovered = [_rec(x) for x in _lines(home) if _rec(x)["action"] == "recovered"]
    assert len(recovered) == 1
    rec = recovered[0]
    assert rec["cut_bytes"] == len(torn) and rec["cut_offset"] == len(b"".join(lines))
    assert rec["cut_sha256"] == hashlib.sha256(torn).hexdigest()
    saved = home / "audit" / rec["saved_as"]
    assert saved.read_bytes() == torn and (saved.stat().st_mode & 0o777) == 0o600


def test_a_corrupted_checkpoint_signature_is_found(home: Path) -> None:
    lines = _lines(home)
    i = next(k for k, ln in enumerate(lines) if _rec(ln)["action"] == "checkpoint")
    rec = _rec(lines[i])
    sig = bytearray(bytes.fromhex(rec["sig"]))
    sig[5] ^= 1
    rec["sig"] = sig.hex()
    lines[i] = canonical(rec) + b"\n"
    _write(home, lines)
    _found(verify(home), "bad-checkpoint", seq=rec["seq"], line=i + 1)
    _found(verify(home, public_only=True), "bad-checkpoint", seq=rec["seq"], line=i + 1)


def test_a_replaced_hmac_key_is_named_once_as_bad_key(home: Path) -> None:
    key = home / "keys" / "audit.key"
    key.write_bytes(secrets.token_bytes(32))
    report = verify(home)
    assert [p.kind for p in report.problems] == ["bad-key"] and report.mode == "public"
    with pytest.raises(AuditLogError, match="not one this host's key wrote"):
        AuditLog.open(home)


def test_a_log_whose_keys_are_gone_is_not_extended_under_new_keys(home: Path) -> None:
    (home / "keys" / "audit.key").unlink()
    with pytest.raises(AuditLogError, match="is gone"):
        AuditLog.open(home)
    assert not (home / "keys" / "audit.key").exists()


def test_a_tail_cut_while_the_writer_was_down_stays_reported(home: Path) -> None:
    """Reopening writes a new head: the cut must survive in the chain itself."""
    lines = _lines(home)
    _write(home, lines[:-2])
    with AuditLog.open(home) as log:
        log.append("exec", principal="alice", exit_code=0)
    report = verify(home)
    p = _found(report, "truncated")
    assert f"record {len(lines)}" in p.message


def test_an_altered_last_record_stops_a_writer_from_chaining_onto_it(home: Path) -> None:
    lines = _lines(home)
    lines[-1] = lines[-1].replace(b'"outcome":"ok"', b'"outcome":"error"')
    _write(home, lines)
    with pytest.raises(AuditLogError, match="warden audit verify"):
        AuditLog.open(home)


def test_a_second_writer_is_refused(home: Path) -> None:
    with AuditLog.open(home), pytest.raises(AuditLogError, match="another process"):
        AuditLog.open(home, lock_timeout=0.1)


def test_a_second_writer_may_wait_for_the_first_to_close(home: Path) -> None:
    import threading

    first = AuditLog.open(home)
    timer = threading.Timer(0.2, first.close)
    timer.start()
    with AuditLog.open(home, lock_timeout=10) as second:
        second.append("exec", principal="second")
    timer.join()
    assert verify(home).ok


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_changed_byte_anywhere_is_found(home: Path, where: float, flip: int) -> None:
    path = home / "audit" / "audit.log"
    original = path.read_bytes()
    data = bytearray(original)
    data[int(where * len(data))] ^= flip
    path.write_bytes(bytes(data))
    try:
        assert not verify(home).ok
        assert not verify(home, public_only=True).ok
    finally:
        path.write_bytes(original)


# -- kill -9 ------------------------------------------------------------------------------

_CHILD = """
import os, sys, threading
from pathlib import Path
from warden.audit import AuditLog
log = AuditLog.open(Path(sys.argv[1]), checkpoint_every=7)
os.write(1, b"ready\\n")

def work(t):
    i = 0
    while True:
        rec = log.append("exec", principal=f"p{t}", pad="x" * (i % 5000), exit_code=i)
        os.write(1, b"%d\\n" % rec["seq"])  # one write: lines of threads never mix
        i += 1

for t in range(int(sys.argv[2]) - 1):
    threading.Thread(target=work, args=(t,), daemon=True).start()
work(-1)
"""


@pytest.mark.parametrize(("round_", "threads"), [(0, 1), (1, 1), (2, 4), (3, 4)])
def test_kill_9_during_appends_loses_no_returned_record(
    tmp_path: Path, round_: int, threads: int
) -> None:
    rng = random.Random(round_)  # noqa: S311 (when to kill, not a secret)
    for _ in range(2):  # kill twice on the same log: recovery after recovery
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(threads)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        returned = [int(x) for x in child.stdout.read().split()]
        child.stdout.close()
        assert returned, "the child appended nothing before it was killed"
        with AuditLog.open(tmp_path) as log:
            log.append("exec", principal="after", exit_code=0)
        seqs = {_rec(x)["seq"] for x in _lines(tmp_path)}
        assert set(returned) <= seqs
        report = verify(tmp_path)
        assert report.ok, report.problems


def test_checkpoints_re_signed_under_a_planted_public_key_are_found(
    home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An attacker without the keys swaps keys/audit-sign.pub for their own and re-signs every
    checkpoint and the head after editing a record. The MAC chain finds it; so does a
    public-key verifier that pinned the real public key earlier."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from warden.audit._format import Head, checkpoint_message, head_slot, public_key_id

    pinned = tmp_path_factory.mktemp("pin") / "audit-sign.pub"
    pinned.write_bytes((home / "keys" / "audit-sign.pub").read_bytes())
    evil = Ed25519PrivateKey.generate()
    lines = _lines(home)
    i = _index(lines, 6)
    rec = _rec(lines[i])
    rec["principal"] = "someone-else"
    lines[i] = canonical(rec) + b"\n"
    for k, ln in enumerate(lines):
        cp = _rec(ln)
        if cp["action"] == "checkpoint":
            cp["key_id"] = public_key_id(evil.public_key())
            cp["sig"] = evil.sign(checkpoint_message(cp)).hex()
            lines[k] = canonical(cp) + b"\n"
    _write(home, lines)
    last = _rec(lines[-1])
    slot = head_slot(evil, Head(last["seq"], last["mac"]))
    (home / "audit" / "head").write_bytes(slot + slot)
    pem = evil.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (home / "keys" / "audit-sign.pub").write_bytes(pem)
    _found(verify(home), "modified", seq=6, line=i + 1)
    _found(verify(home, public_only=True, public_key=pinned), "bad-key")


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A real 256 KiB tmpfs: the disk fills up for real (needs root to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        check=False,
        capture_output=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_append_and_leaves_no_partial_record(small_fs: Path) -> None:
    home = small_fs / "home"
    filler = small_fs / "filler"
    with AuditLog.open(home) as log:
        log.append("exec", principal="a", exit_code=0)
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 6000))  # about one 8 KiB record short
        last_ok = log.last_seq
        with pytest.raises(AuditLogError, match="not written"):
            for _ in range(20):
                log.append("exec", principal="a", pad="p" * 8000)
                last_ok = log.last_seq
        assert log.last_seq == last_ok
        assert (home / "audit" / "audit.log").read_bytes().endswith(b"\n")
        filler.unlink()
        log.append("exec", principal="a", exit_code=1)  # the chain goes on where it was
    report = verify(home)
    assert report.ok, report.problems


def test_a_full_disk_under_threads_fails_whole_groups_and_keeps_every_returned_record(
    small_fs: Path,
) -> None:
    import threading

    home = small_fs / "home"
    filler = small_fs / "filler"
    returned: list[int] = []
    failed: list[str] = []
    lock = threading.Lock()
    with AuditLog.open(home) as log:
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 40_000))

        def work(t: int) -> None:
            for i in range(40):
                try:
                    rec = log.append("exec", principal=f"t{t}", pad="q" * 6000, exit_code=i)
                except AuditLogError as exc:
                    with lock:
                        failed.append(str(exc))
                    return
                with lock:
                    returned.append(int(str(rec["seq"])))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert failed and returned, (failed, returned)
        assert all("not written" in x for x in failed)
        assert (home / "audit" / "audit.log").read_bytes().endswith(b"\n")
        filler.unlink()  # space again: the writer goes on from the last record on disk
        log.append("exec", principal="after", exit_code=0)
    seqs = [_rec(x)["seq"] for x in _lines(home)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert set(returned) <= set(seqs)
    report = verify(home)
    assert report.ok, report.problems


def test_a_head_a_whole_group_behind_after_a_crash_is_not_a_cut(home: Path) -> None:
    """Concurrent appends share one write; a crash before that group's head is written leaves
    the head several records behind, naming a record the log still has: not a truncation."""
    from warden.audit._format import Head, head_slot, load_keys

    lines = _lines(home)
    behind = _rec(lines[-4])
    slot = head_slot(load_keys(home, create=False).signer, Head(behind["seq"], behind["mac"]))
    (home / "audit" / "head").write_bytes(slot + b"\0" * len(slot))  # the other slot torn
    with AuditLog.open(home) as log:
        log.append("exec", principal="alice", exit_code=0)
    actions = [_rec(x)["action"] for x in _lines(home)]
    assert "log-truncated" not in actions
    assert verify(home).ok


def test_a_head_naming_a_record_the_log_does_not_have_is_recorded_as_a_cut(home: Path) -> None:
    from warden.audit._format import Head, head_slot, load_keys

    lines = _lines(home)
    behind = _rec(lines[-4])
    slot = head_slot(load_keys(home, create=False).signer, Head(behind["seq"], "ab" * 32))
    (home / "audit" / "head").write_bytes(slot + slot)
    with AuditLog.open(home) as log:
        log.append("exec", principal="alice", exit_code=0)
    assert [_rec(x)["action"] for x in _lines(home)].count("log-truncated") == 1
    _found(verify(home), "truncated")


def test_a_forged_record_appended_at_the_tail_is_found_as_inserted(home: Path) -> None:
    lines = _lines(home)
    last = _rec(lines[-1])
    forged: dict[str, Any] = {
        "seq": last["seq"] + 1,
        "time": last["time"] + 1,
        "action": "exec",
        "principal": "mallory",
        "sandbox": None,
        "outcome": "ok",
        "prev": last["mac"],
        "mac": "00" * 32,
    }
    _write(home, [*lines, canonical(forged) + b"\n"])
    report = verify(home)
    _found(report, "inserted", seq=last["seq"] + 1, line=len(lines) + 1)
    assert {p.kind for p in report.problems} == {"inserted"}
