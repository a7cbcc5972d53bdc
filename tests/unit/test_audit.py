"""The audit log's format, bounds, concurrency, readers and CLI (real files, no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from warden._errors import AuditRecordError
from warden.audit import (
    MAX_RECORD_BYTES,
    AuditLog,
    _format,
    argv_digest,
    follow,
    parse_since,
    records,
    verify,
)
from warden.audit._format import MAC_DOMAIN, canonical
from warden.cli.app import app
from warden.cli.audit import format_record


def _recs(home: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (home / "audit" / "audit.log").read_bytes().splitlines()]


# -- format --------------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_and_ascii() -> None:
    got = canonical({"b": 1, "a": "é\n", "c": None, "d": [True, 1.5]})
    assert got == b'{"a":"\\u00e9\\n","b":1,"c":null,"d":[true,1.5]}'
    with pytest.raises(ValueError):
        canonical({"x": math.nan})


def test_argv_digest_is_sha256_of_the_argv_as_canonical_json() -> None:
    assert argv_digest(["echo", "é"]) == hashlib.sha256(b'{"argv":["echo","\\u00e9"]}').hexdigest()
    assert argv_digest(["a b"]) != argv_digest(["a", "b"])
    assert argv_digest(("x",)) == argv_digest(["x"])


def test_each_record_mac_is_hmac_sha256_of_its_canonical_bytes_chained_by_prev(
    tmp_path: Path,
) -> None:
    with AuditLog.open(tmp_path) as log:
        log.append("exec", principal="alice", exit_code=3)
    key = (tmp_path / "keys" / "audit.key").read_bytes()
    recs = _recs(tmp_path)
    prev = "0" * 64
    for rec in recs:
        mac = rec.pop("mac")
        assert rec["prev"] == prev
        want = hmac.new(key, MAC_DOMAIN + canonical(rec), hashlib.sha256).hexdigest()
        assert mac == want
        prev = mac
    assert [r["action"] for r in recs] == ["log-open", "exec", "checkpoint"]
    assert [r["seq"] for r in recs] == [1, 2, 3]


def test_files_and_keys_are_private_and_the_public_key_readable(tmp_path: Path) -> None:
    AuditLog.open(tmp_path).close()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "audit") == 0o700 and mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "audit" / "audit.log") == 0o600
    assert mode(tmp_path / "audit" / "head") == 0o600
    assert mode(tmp_path / "keys" / "audit.key") == 0o600
    assert mode(tmp_path / "keys" / "audit-sign.key") == 0o600
    assert mode(tmp_path / "keys" / "audit-sign.pub") == 0o644


# -- what a record may hold ---------------------------------------------------------------


def test_a_record_over_the_bound_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path) as log:
        before = log.last_seq
        size = (tmp_path / "audit" / "audit.log").stat().st_size
        with pytest.raises(AuditRecordError, match="digest"):
            log.append("exec", principal="a", argv="x" * MAX_RECORD_BYTES)
        assert log.last_seq == before
        assert (tmp_path / "audit" / "audit.log").stat().st_size == size
        log.append("exec", principal="a", argv_sha256="0" * 64)  # seq not consumed
        assert log.last_seq == before + 1
    assert verify(tmp_path).ok


@pytest.mark.parametrize(
    ("action", "fields", "match"),
    [
        ("exec", {"seq": 1}, "reserved"),
        ("exec", {"mac": "x"}, "reserved"),
        ("exec", {"Bad-Name": 1}, "reserved or not"),
        ("exec", {"argv": ["a", "b"]}, "only str, int"),
        ("exec", {"x": math.inf}, "finite"),
        ("Exec Now", {}, "action"),
    ],
)
def test_bad_fields_are_refused(
    tmp_path: Path, action: str, fields: dict[str, Any], match: str
) -> None:
    with AuditLog.open(tmp_path) as log, pytest.raises(AuditRecordError, match=match):
        log.append(action, principal="a", **fields)


def test_bad_outcome_and_empty_principal_are_refused(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path) as log:
        with pytest.raises(AuditRecordError, match="outcome"):
            log.append("exec", principal="a", outcome="maybe")
        with pytest.raises(AuditRecordError, match="principal"):
            log.append("exec", principal="")


# -- concurrency and checkpoints ----------------------------------------------------------


def test_threads_appending_get_unique_contiguous_seqs(tmp_path: Path) -> None:
    got: list[int] = []
    lock = threading.Lock()
    with AuditLog.open(tmp_path, checkpoint_every=17) as log:

        def work(t: int) -> None:
            for i in range(40):
                rec = log.append("exec", principal=f"t{t}", exit_code=i)
                with lock:
                    got.append(int(str(rec["seq"])))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert len(set(got)) == len(got) == 240
    seqs = [r["seq"] for r in _recs(tmp_path)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert set(got) <= set(seqs)
    assert verify(tmp_path).ok


def test_append_async_runs_off_the_event_loop(tmp_path: Path) -> None:
    async def main(log: AuditLog) -> tuple[list[dict[str, object]], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        done = await asyncio.gather(
            *(log.append_async("exec", principal="a", exit_code=i) for i in range(30))
        )
        stop.set()
        await tick
        return list(done), ticks

    with AuditLog.open(tmp_path) as log:
        done, ticks = asyncio.run(main(log))
    assert sorted(int(str(r["seq"])) for r in done) == list(range(2, 32))
    assert ticks > 0 and verify(tmp_path).ok


def test_checkpoints_come_every_n_records_after_t_seconds_and_at_close(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path, checkpoint_every=4, checkpoint_interval=3600) as log:
        for _ in range(7):
            log.append("exec", principal="a")
    actions = [r["action"] for r in _recs(tmp_path)]
    # log-open + 3 exec, checkpoint, 4 exec, checkpoint, close: nothing since -> none
    assert actions.count("checkpoint") == 2 and actions[-1] == "checkpoint"
    with AuditLog.open(tmp_path, checkpoint_every=1000, checkpoint_interval=0.05) as log:
        log.append("exec", principal="a")
        time.sleep(0.1)
        log.append("exec", principal="a")
        assert _recs(tmp_path)[-1]["action"] == "checkpoint"
    cp = _recs(tmp_path)[-1]
    assert cp["covers"] == cp["seq"] - 1 and cp["prev"] == _recs(tmp_path)[-2]["mac"]
    assert verify(tmp_path).ok


@pytest.mark.parametrize("window", [64, 300, 1 << 20])
def test_reopening_reads_back_only_to_the_last_checkpoint_and_chains_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    import warden.audit.log as log_module

    monkeypatch.setattr(log_module, "_SCAN_WINDOW", window)
    for round_ in range(3):
        log = AuditLog.open(tmp_path, checkpoint_every=7)
        for i in range(10 + round_):
            log.append("exec", principal="a", pad="y" * (i * 13), exit_code=i)
        if round_ == 1:  # the writer dies: no closing checkpoint, a torn tail
            log._release()
            with (tmp_path / "audit" / "audit.log").open("ab") as f:
                f.write(b'{"action":"ex')
        else:
            log.close()
        report = verify(tmp_path)
        assert report.ok or round_ == 1, report.problems
    assert verify(tmp_path).ok
    assert [r["action"] for r in _recs(tmp_path)].count("recovered") == 1


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fields=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
            lambda k: (
                k not in {"seq", "time", "action", "principal", "sandbox", "outcome", "prev", "mac"}
            )
        ),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40),
        max_size=6,
    )
)
def test_any_valid_fields_round_trip_and_verify(tmp_path: Path, fields: dict[str, Any]) -> None:
    home = tmp_path / os.urandom(4).hex()
    with AuditLog.open(home) as log:
        rec = log.append("exec", principal="ünï", sandbox=None, **fields)
    assert verify(home).ok
    stored = next(r for r in records(home) if r["seq"] == rec["seq"])
    assert stored == rec


# -- readers --------------------------------------------------------------------------------


def _sample(home: Path) -> None:
    with AuditLog.open(home) as log:
        log.append("exec", principal="alice", sandbox="sb1", argv_sha256="a" * 64, exit_code=0)
        log.append("files-write", principal="bob", sandbox="sb2", path="/x", size=3)
        log.append("exec", principal="bob", sandbox="sb1", outcome="denied", reason="owner")


def test_records_filter_by_principal_sandbox_action_and_time(tmp_path: Path) -> None:
    _sample(tmp_path)
    assert [r["action"] for r in records(tmp_path, principal="bob")] == ["files-write", "exec"]
    assert len(list(records(tmp_path, sandbox="sb1"))) == 2
    assert len(list(records(tmp_path, action="exec", principal="alice"))) == 1
    assert list(records(tmp_path, since=time.time() + 60)) == []
    assert len(list(records(tmp_path, since=time.time() - 60))) == len(_recs(tmp_path))


def test_readers_never_return_a_partial_line(tmp_path: Path) -> None:
    _sample(tmp_path)
    n = len(_recs(tmp_path))
    with (tmp_path / "audit" / "audit.log").open("ab") as f:
        f.write(b'{"action":"exec","seq":9')
    assert len(list(records(tmp_path))) == n


def test_follow_yields_the_last_n_then_new_records(tmp_path: Path) -> None:
    _sample(tmp_path)
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def reader() -> None:
        for rec in follow(tmp_path, action="exec", last=1, poll_s=0.02, stop=done.is_set):
            got.append(rec)

    th = threading.Thread(target=reader)
    th.start()
    try:
        time.sleep(0.2)
        path = tmp_path / "audit" / "audit.log"
        line = json.dumps({"seq": 99, "action": "exec", "principal": "p"}).encode()
        with path.open("ab") as f:  # a line written in two parts: read only when whole
            f.write(line[:10])
            f.flush()
            time.sleep(0.1)
            f.write(line[10:] + b"\n")
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        done.set()
        th.join(timeout=5)
    assert [r["principal"] for r in got] == ["bob", "p"]


def test_parse_since_takes_ages_and_iso_times() -> None:
    now = 1_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("1970-01-02T00:00:00Z") == 86400
    assert parse_since("1970-01-02T00:00:00") == 86400
    with pytest.raises(ValueError, match="not a time"):
        parse_since("yesterday")


# -- CLI ------------------------------------------------------------------------------------


def test_cli_verify_says_intact_then_lists_each_problem(tmp_path: Path) -> None:
    _sample(tmp_path)
    runner = CliRunner()
    env = {"WARDEN_HOME": str(tmp_path)}
    ok = runner.invoke(app, ["audit", "verify"], env=env)
    assert ok.exit_code == 0 and "intact" in ok.stdout
    path = tmp_path / "audit" / "audit.log"
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[2]
    path.write_bytes(b"".join(lines))
    bad = runner.invoke(app, ["audit", "verify"], env=env)
    assert bad.exit_code == 1
    assert "line 3 (seq 3): deleted" in bad.stdout
    js = runner.invoke(app, ["audit", "verify", "--json"], env=env)
    body = json.loads(js.stdout)
    assert js.exit_code == 1 and body["ok"] is False
    assert body["problems"][0]["kind"] == "deleted" and body["problems"][0]["seq"] == 3


def test_cli_verifies_a_copy_with_only_the_public_key(tmp_path: Path) -> None:
    import shutil

    _sample(tmp_path / "host")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("audit/audit.log", "audit/head", "keys/audit-sign.pub"):
        shutil.copy(tmp_path / "host" / name, copy)
    runner = CliRunner()
    args = ["audit", "verify", "--public-only", "--log", str(copy / "audit.log")]
    args += ["--public-key", str(copy / "audit-sign.pub")]
    env = {"WARDEN_HOME": str(tmp_path / "nowhere")}
    ok = runner.invoke(app, args, env=env)
    assert ok.exit_code == 0, ok.stdout
    assert "intact" in ok.stdout and "public key only" in ok.stdout
    data = (copy / "audit.log").read_bytes()
    (copy / "audit.log").write_bytes(data.replace(b'"size":3', b'"size":4'))
    bad = runner.invoke(app, args, env=env)
    assert bad.exit_code == 1 and ": modified:" in bad.stdout


def test_cli_tail_and_search(tmp_path: Path) -> None:
    _sample(tmp_path)
    runner = CliRunner()
    env = {"WARDEN_HOME": str(tmp_path)}
    tail = runner.invoke(app, ["audit", "tail", "-n", "2", "--action", "exec"], env=env)
    assert tail.exit_code == 0
    out = tail.stdout.splitlines()
    assert len(out) == 2 and "alice  exec  sb1  ok" in out[0] and "bob  exec  sb1  denied" in out[1]
    found = runner.invoke(
        app, ["audit", "search", "--principal", "bob", "--since", "10m", "--json"], env=env
    )
    assert found.exit_code == 0
    assert [json.loads(x)["action"] for x in found.stdout.splitlines()] == ["files-write", "exec"]
    none = runner.invoke(app, ["audit", "search", "--since", "soon"], env=env)
    assert none.exit_code == 2


def test_cli_without_a_log_says_where_it_looked(tmp_path: Path) -> None:
    got = CliRunner().invoke(app, ["audit", "verify"], env={"WARDEN_HOME": str(tmp_path)})
    assert got.exit_code == 125
    assert "no audit log" in got.stderr


def test_format_record_is_one_line_with_short_digests() -> None:
    line = format_record(
        {
            "seq": 7,
            "time": 0.0,
            "action": "exec",
            "principal": "alice",
            "sandbox": None,
            "outcome": "ok",
            "argv_sha256": "ab" * 32,
            "path": "/a b",
            "mac": "00" * 32,
        }
    )
    assert (
        line
        == '1970-01-01T00:00:00Z  #7  alice  exec  -  ok  argv_sha256=abababababab…  path="/a b"'
    )


def test_cli_tail_follow_prints_new_records_as_they_come(tmp_path: Path) -> None:
    import subprocess
    import sys

    _sample(tmp_path)
    code = "from warden.cli.main import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "audit", "tail", "-f", "-n", "1", "--action", "exec"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "WARDEN_HOME": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        assert "bob  exec  sb1  denied" in proc.stdout.readline()
        with AuditLog.open(tmp_path) as log:
            log.append("exec", principal="carol", sandbox="sb9", exit_code=7)
        assert "carol  exec  sb9  ok" in proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_verify_while_the_writer_appends_reports_nothing(tmp_path: Path) -> None:
    """The head is read before the log, and a partial last line is read again: a busy
    writer is not mistaken for a cut or torn tail."""
    stop = threading.Event()
    with AuditLog.open(tmp_path, checkpoint_every=9) as log:

        def writer() -> None:
            i = 0
            while not stop.is_set():
                log.append("exec", principal="w", pad="z" * (i % 3000), exit_code=i)
                i += 1

        th = threading.Thread(target=writer)
        th.start()
        try:
            reports = []
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                reports.append(verify(tmp_path))
        finally:
            stop.set()
            th.join()
    assert len(reports) > 3
    assert all(r.ok for r in reports), next(r.problems for r in reports if not r.ok)


def test_a_head_of_the_older_format_is_still_read(tmp_path: Path) -> None:
    """A head written before it held the tail's digest (two 256-byte slots) still names the
    last record, so a host's log verifies across the upgrade."""
    from warden.audit._format import head_path, read_head
    from warden.audit.log import AuditLog

    with AuditLog.open(tmp_path) as log:
        log.append("exec", principal="old")
    keys = _format.load_keys(tmp_path, create=False)
    last = read_head(head_path(tmp_path), keys.public)
    assert last is not None and last.span is not None
    body = {"mac": last.mac, "seq": last.seq}
    sig = keys.signer.sign(_format.HEAD_DOMAIN + canonical(body)).hex()
    slot = canonical({**body, "sig": sig}).ljust(255, b" ") + b"\n"
    head_path(tmp_path).write_bytes(slot + b" " * 256)
    old = read_head(head_path(tmp_path), keys.public)
    assert old is not None and (old.seq, old.mac, old.span) == (last.seq, last.mac, None)
    assert verify(tmp_path).ok
