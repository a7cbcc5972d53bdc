"""The daemon records who did what in its audit log, before it answers (issue 9).

A real `warden serve` and real VMs: every lifecycle change, every exec (a digest of its argv,
the principal, the guest user, the exit code, the duration), every file transfer (path, size,
SHA-256) and every failed operation is in the log, under the caller's principal; the log
verifies; after a kill -9 of the daemon, every answered request's record is there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import WARDEN, ServeProcess
from warden.audit import argv_digest, records, verify
from warden.config import Paths

SB = "/v1/sandboxes"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("audit-daemon")
    d = ServeProcess(tmp / "w.sock", tmp / "daemon.log", args=["--charge", "limits"])
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _home() -> Path:
    return Paths.from_env().home


def _of(vm_id: str) -> list[dict[str, Any]]:
    return list(records(_home(), sandbox=vm_id))


def _one(found: list[dict[str, Any]], action: str) -> dict[str, Any]:
    matching = [r for r in found if r["action"] == action]
    assert len(matching) == 1, (action, found)
    return matching[0]


def test_a_kill_9_during_a_burst_of_execs_loses_no_answered_record(tmp_path: Path) -> None:
    """First in the module: before its shared daemon starts (one daemon per home).

    Four clients run execs as fast as they can; the daemon is killed (-9) in the middle.
    Every exec whose answer came whole is in the log; after a restart the log verifies."""
    d = ServeProcess(tmp_path / "k.sock", tmp_path / "k.log", args=["--charge", "limits"])
    d.start()
    assert d.proc is not None
    with d.client() as c:
        vm_id = c.post(SB, json={}).raise_for_status().json()["id"]
    answered: list[list[str]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with d.client() as c:
            for i in range(1000):
                argv = ["echo", f"{n}-{i}"]
                try:
                    r = c.post(f"{SB}/{vm_id}/exec", json={"cmd": argv})
                except httpx.TransportError:
                    return  # the daemon is gone
                if r.status_code != 200 or b"exit_code" not in r.content:
                    return
                with lock:
                    answered.append(argv)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(answered) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(d.proc.pid, signal.SIGKILL)  # our own child, by pid, mid-burst
    d.proc.wait(timeout=30)
    d.proc = None
    for t in threads:
        t.join(timeout=60)
    assert len(answered) >= 12
    recorded = {r["argv_sha256"] for r in _of(vm_id) if r["action"] == "exec"}
    assert {argv_digest(a) for a in answered} <= recorded
    d.start()  # takes the VM back, and the log (a torn last line is cut and noted)
    try:
        with d.client() as c:
            assert c.delete(f"{SB}/{vm_id}", params={"force": "true"}).status_code == 204
    finally:
        d.stop()
    assert _of(vm_id)[-1]["action"] == "rm"
    report = verify(_home())
    assert report.ok, report.problems


def test_lifecycle_exec_and_files_are_recorded_under_the_caller(daemon: ServeProcess) -> None:
    data = os.urandom(70_000)
    argv = ["sh", "-c", "echo audited; exit 7"]
    with daemon.client() as c:
        vm_id = c.post(SB, json={"name": "audited"}).raise_for_status().json()["id"]
        r = c.post(f"{SB}/{vm_id}/exec", json={"cmd": argv})
        assert r.status_code == 200
        r = c.put(f"{SB}/{vm_id}/files", params={"path": "/tmp/blob"}, content=data)
        assert r.status_code == 200, r.text
        assert c.get(f"{SB}/{vm_id}/files", params={"path": "/tmp/blob"}).content == data
        assert c.get(f"{SB}/{vm_id}/files", params={"path": "/nope"}).status_code == 404
        c.post(f"{SB}/{vm_id}/stop").raise_for_status()
        assert c.delete(f"{SB}/{vm_id}").status_code == 204
        whoami = c.get("/v1/whoami").json()["name"]

    found = _of(vm_id)
    assert [r["action"] for r in found if r["outcome"] == "ok"] == [
        "create",
        "exec",
        "files-write",
        "files-read",
        "stop",
        "rm",
    ], found
    assert {r["principal"] for r in found} == {whoami}
    exec_ = _one(found, "exec")
    assert exec_["argv_sha256"] == argv_digest(argv) and exec_["exit_code"] == 7
    assert exec_["user"] == "user" and 0 < exec_["duration_s"] < 120
    assert "audited" not in str(exec_) and "echo" not in str(exec_)  # digests, never the argv
    digest = hashlib.sha256(data).hexdigest()
    wrote = _one(found, "files-write")
    assert (wrote["path"], wrote["size"], wrote["sha256"]) == ("/tmp/blob", len(data), digest)
    read = [r for r in found if r["action"] == "files-read"]
    assert [(r["outcome"], r["path"]) for r in read] == [("ok", "/tmp/blob"), ("error", "/nope")]
    assert read[0]["sha256"] == digest and read[0]["size"] == len(data)
    assert read[1]["error"] == "GuestFileError"
    create = _one(found, "create")
    assert create["image"] == "default"
    report = verify(_home())
    assert report.ok, report.problems


def test_a_refused_operation_is_recorded_as_an_error(daemon: ServeProcess) -> None:
    with daemon.client() as c:
        assert c.post(f"{SB}/no-such-sandbox/stop").status_code == 404
    found = _of("no-such-sandbox")
    assert [(r["action"], r["outcome"], r["error"]) for r in found][-1] == (
        "stop",
        "error",
        "VMNotFoundError",
    )


def test_the_log_is_the_daemons_alone(daemon: ServeProcess) -> None:
    """One writer per home: the log's lock is held while the daemon runs."""
    from warden._errors import AuditLogError
    from warden.audit import AuditLog

    with pytest.raises(AuditLogError):
        AuditLog.open(_home())


def test_token_changes_are_recorded_with_a_daemon(
    daemon: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`warden token` goes through the daemon that answers; the daemon records each change
    (never the token's text)."""
    monkeypatch.setenv("WARDEN_HOST", daemon.url)
    made = subprocess.run(
        [WARDEN, "token", "create", "auditee", "--role", "user"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text = made.stdout.strip()
    token_id = text.split("_")[1]
    subprocess.run([WARDEN, "token", "revoke", token_id], check=True, timeout=60)
    found = [r for r in records(_home()) if r.get("token_id") == token_id]
    assert [(r["action"], r["token_name"], r["roles"]) for r in found] == [
        ("token-create", "auditee", "user"),
        ("token-revoke", "auditee", "user"),
    ]
    log = (_home() / "audit" / "audit.log").read_text()
    assert text not in log and text.split("_")[2] not in log


def test_token_changes_are_recorded_without_a_daemon(tmp_path: Path) -> None:
    """No daemon: the command records the change itself, as the local user; while a daemon
    holds the log but cannot be reached, nothing is changed."""
    env = {k: v for k, v in os.environ.items() if k != "WARDEN_HOST"}
    env["WARDEN_HOME"] = str(tmp_path / "home")
    made = subprocess.run(
        [WARDEN, "token", "create", "offline"], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    token_id = made.stdout.strip().split("_")[1]
    found = [r for r in records(tmp_path / "home") if r.get("token_id") == token_id]
    assert [(r["action"], r["principal"], r["via"]) for r in found] == [
        ("token-create", "root", "cli")
    ]
    assert verify(tmp_path / "home").ok


def test_a_token_change_the_log_cannot_record_is_not_made(
    daemon: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon holds the log but is not on the default socket (no WARDEN_HOST): the
    command refuses, saying what to do, and no token is made."""
    monkeypatch.delenv("WARDEN_HOST", raising=False)
    p = subprocess.run(
        [WARDEN, "token", "create", "unrecorded"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 125 and "WARDEN_HOST" in p.stderr, p.stderr
    listed = subprocess.run(
        [WARDEN, "token", "list", "--json"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "WARDEN_HOST": daemon.url}, check=True,
    )  # fmt: skip
    assert "unrecorded" not in listed.stdout
