"""The manager daemon (`warden serve`) through its REST API on a unix socket, and the CLI.

The daemon runs as a subprocess with its socket in tmp_path and the same $WARDEN_HOME as the
other tests (so the built image and boot snapshots are found).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import qemu_pids, runtime_dirs
from warden.vmm import ownership

pytestmark = pytest.mark.vm

WARDEN = str(Path(sys.executable).parent / "warden")
MEMORY = 128


class Daemon:
    """A `warden serve` subprocess; start/kill/term by its own pid only."""

    def __init__(self, socket: Path, log: Path) -> None:
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [WARDEN, "serve", "--socket", str(self.socket), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with self.client() as c:
                    if c.get("/v1/info").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the daemon did not answer: {self.log.read_text()}")

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://warden",
            timeout=httpx.Timeout(120.0),
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        self.proc = None


@pytest.fixture
def daemon(tmp_path: Path, no_leaks: None) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "w.sock", tmp_path / "daemon.log")
    d.start()
    try:
        yield d
    finally:
        if d.proc is None:
            d.start()
        with d.client() as c:
            for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
            assert c.get("/v1/sandboxes", params={"all": "true"}).json() == []
        d.stop()
        assert not d.socket.exists(), "the daemon left its socket behind"


def _exec(
    c: httpx.Client, ref: str, cmd: list[str] | str, **extra: object
) -> tuple[bytes, bytes, dict[str, object]]:
    out, err = b"", b""
    final: dict[str, object] = {}
    with c.stream("POST", f"/v1/sandboxes/{ref}/exec", json={"cmd": cmd, **extra}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            msg = json.loads(line)
            if "stdout" in msg:
                out += base64.b64decode(msg["stdout"])
            elif "stderr" in msg:
                err += base64.b64decode(msg["stderr"])
            else:
                final = msg
    return out, err, final


def _create(c: httpx.Client, **body: object) -> dict[str, Any]:
    r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY, **body})
    assert r.status_code == 201, r.text
    vm = r.json()
    assert isinstance(vm, dict)
    return vm


def test_api_contract(daemon: Daemon) -> None:
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o600"
    # The store is the shared $WARDEN_HOME's: a name of its own keeps an earlier, interrupted
    # run's leftovers from clashing with this one.
    name = f"contract-{secrets.token_hex(4)}"
    with daemon.client() as c:
        vm = _create(c, name=name, labels={"team": "a"})
        vm_id = vm["id"]
        assert vm["state"] == "running" and vm["labels"] == {"team": "a"}

        assert [v["id"] for v in c.get("/v1/sandboxes").json()] == [vm_id]
        assert c.get(f"/v1/sandboxes/{vm_id}").json()["name"] == name
        assert c.get(f"/v1/sandboxes/{name}").json()["id"] == vm_id

        out, err, final = _exec(c, vm_id, ["sh", "-c", "echo out; echo err >&2; exit 5"])
        assert (out, err) == (b"out\n", b"err\n")
        assert final == {"exit_code": 5, "signal": None, "timed_out": False}
        stdin = base64.b64encode(b"piped").decode()
        out, _, final = _exec(c, name, "cat", stdin=stdin)
        assert out == b"piped" and final["exit_code"] == 0

        data = os.urandom(3 * 1024 * 1024 + 17)
        r = c.put(f"/v1/sandboxes/{vm_id}/files", params={"path": "/root/d.bin"}, content=data)
        assert r.status_code == 200, r.text
        assert r.json()["size"] == len(data)
        r = c.get(f"/v1/sandboxes/{vm_id}/files", params={"path": "/root/d.bin"})
        assert r.status_code == 200 and r.content == data
        r = c.get(f"/v1/sandboxes/{vm_id}/files", params={"path": "/root/missing"})
        assert r.status_code == 404

        r = c.post("/v1/sandboxes", json={"name": name, "memory_mib": MEMORY})
        assert r.status_code == 409 and name in r.json()["detail"]
        r = c.get("/v1/sandboxes/no-such-vm")
        assert r.status_code == 404 and "no-such-vm" in r.json()["detail"]
        r = c.post("/v1/sandboxes/no-such-vm/exec", json={"cmd": ["true"]})
        assert r.status_code == 404
        r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY, "bogus": 1})
        assert r.status_code == 422
        r = c.post(f"/v1/sandboxes/{vm_id}/exec", json={"cmd": ["true"], "bogus": 1})
        assert r.status_code == 422
        r = c.post("/v1/sandboxes", json={"memory_mib": 1})
        assert r.status_code == 422
        assert len(c.get("/v1/sandboxes").json()) == 1, "a refused create left a trace"

        info = c.get("/v1/info").json()
        assert info["reservations"]["vms"] == 1
        assert info["reservations"]["memory_mib"] == MEMORY
        assert c.get(f"/v1/sandboxes/{vm_id}/logs").status_code == 200

        r = c.delete(f"/v1/sandboxes/{vm_id}")
        assert r.status_code == 409
        r = c.post(f"/v1/sandboxes/{vm_id}/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        assert c.get("/v1/sandboxes").json() == []
        assert [v["state"] for v in c.get("/v1/sandboxes", params={"all": "true"}).json()] == [
            "stopped"
        ]
        assert c.delete(f"/v1/sandboxes/{vm_id}").status_code == 204
        assert c.get(f"/v1/sandboxes/{vm_id}").status_code == 404


def test_vms_survive_kill_and_sigterm_of_the_daemon(daemon: Daemon) -> None:
    with daemon.client() as c:
        vm = _create(c)
    vm_id, pid = vm["id"], vm["pid"]
    assert isinstance(pid, int)

    daemon.signal(signal.SIGKILL)
    assert ownership.proc_start_time(pid) is not None, "kill -9 of the daemon killed the VM"
    daemon.start()
    with daemon.client() as c:
        listed = c.get("/v1/sandboxes").json()
        assert [(v["id"], v["state"]) for v in listed] == [(vm_id, "running")]
        out, _, final = _exec(c, vm_id, ["echo", "after kill"])
        assert out == b"after kill\n" and final["exit_code"] == 0

    daemon.signal(signal.SIGTERM)
    assert not daemon.socket.exists()
    assert ownership.proc_start_time(pid) is not None, "SIGTERM of the daemon killed the VM"
    daemon.start()
    with daemon.client() as c:
        assert [v["state"] for v in c.get("/v1/sandboxes").json()] == ["running"]
        out, _, _ = _exec(c, vm_id, "echo after term")
        assert out == b"after term\n"
        assert c.delete(f"/v1/sandboxes/{vm_id}", params={"force": "true"}).status_code == 204
    deadline = time.monotonic() + 5
    while pid in qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in qemu_pids()


def test_a_vm_that_died_while_the_daemon_was_down_is_marked_failed(daemon: Daemon) -> None:
    with daemon.client() as c:
        vm = _create(c)
    daemon.signal(signal.SIGKILL)
    os.kill(vm["pid"], signal.SIGKILL)  # the QEMU this test's daemon started
    deadline = time.monotonic() + 5
    while ownership.proc_start_time(vm["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    daemon.start()
    with daemon.client() as c:
        got = c.get(f"/v1/sandboxes/{vm['id']}").json()
        assert got["state"] == "failed" and "not running" in got["error"]
        assert c.get("/v1/sandboxes").json() == []
    assert vm["id"] not in runtime_dirs(), "the dead VM's runtime dir was not freed"


def test_kill_9_of_the_daemon_during_an_exec(daemon: Daemon) -> None:
    import threading

    with daemon.client() as c:
        vm = _create(c)
    seen: list[BaseException | bytes] = []

    def run() -> None:
        try:
            with (
                daemon.client() as c,
                c.stream(
                    "POST", f"/v1/sandboxes/{vm['id']}/exec", json={"cmd": "echo go; sleep 30"}
                ) as r,
            ):
                for line in r.iter_lines():
                    seen.append(line.encode())
        except httpx.HTTPError as exc:
            seen.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    daemon.signal(signal.SIGKILL)
    t.join(timeout=10)
    assert not t.is_alive(), "the in-flight exec hung when the daemon died"
    assert isinstance(seen[-1], httpx.HTTPError)
    daemon.start()
    with daemon.client() as c:
        out, _, final = _exec(c, vm["id"], ["echo", "still usable"])
        assert out == b"still usable\n" and final["exit_code"] == 0


def test_a_vm_that_dies_is_marked_failed(daemon: Daemon) -> None:
    with daemon.client() as c:
        vm = _create(c)
        pid = vm["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)  # a QEMU this test's daemon started for it
        deadline = time.monotonic() + 5
        state = "running"
        while time.monotonic() < deadline:
            state = c.get(f"/v1/sandboxes/{vm['id']}").json()["state"]
            if state == "failed":
                break
            time.sleep(0.05)
        assert state == "failed"


def test_cli_against_the_daemon(daemon: Daemon) -> None:
    env = {**os.environ, "WARDEN_HOST": str(daemon.socket)}

    def warden(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [WARDEN, *args], capture_output=True, env=env, timeout=300, check=False
        )

    p = warden("create", "--memory", str(MEMORY), "--name", "cli", "--label", "k=v")
    assert p.returncode == 0, p.stderr
    vm_id = p.stdout.decode().strip()
    p = warden("exec", vm_id, "--", "sh", "-c", "echo hi; exit 3")
    assert p.returncode == 3 and p.stdout == b"hi\n"
    p = warden("ps", "--format", "json")
    assert [v["id"] for v in json.loads(p.stdout)] == [vm_id]
    assert json.loads(warden("inspect", "cli").stdout)["labels"] == {"k": "v"}
    assert warden("info").returncode == 0
    p = warden("rm", vm_id)
    assert p.returncode != 0 and b"force" in p.stderr
    assert warden("rm", "-f", vm_id).returncode == 0
    p = warden("inspect", vm_id)
    assert p.returncode != 0 and b"no VM" in p.stderr


def test_cli_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    env = {**os.environ, "WARDEN_HOST": str(tmp_path / "none.sock")}
    p = subprocess.run([WARDEN, "ps"], capture_output=True, env=env, timeout=60, check=False)
    assert p.returncode != 0 and b"warden serve" in p.stderr
