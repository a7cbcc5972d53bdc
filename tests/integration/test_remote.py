"""Remote mode specifics: warden.connect(), errors, `warden cp`, and `warden run` on a daemon."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import warden
from tests.integration.conftest import ServeProcess
from warden.sdk import RemoteUnsupportedError, _lines, _portal
from warden.sdk._endpoint import Endpoint
from warden.sdk._lines import RecordPool
from warden.sdk._remote import RemoteAgent, RemoteMachine

pytestmark = pytest.mark.vm

WARDEN = str(Path(sys.executable).parent / "warden")


def _warden(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [WARDEN, *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_connect_refuses_a_bad_url_and_a_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(warden.SpecError, match="https://host:port"):
        warden.connect("ftp://nowhere")
    with pytest.raises(warden.HostError, match="warden serve"):
        warden.connect(f"unix://{tmp_path / 'none.sock'}")


def test_connect_defaults_to_warden_host(
    warden_daemon: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_HOST", str(warden_daemon.socket))
    client = warden.connect()
    assert client.url == warden_daemon.url
    assert "memory" in str(client.info()).lower()


def test_a_remote_sandbox_lives_on_the_daemon_until_killed(warden_daemon: ServeProcess) -> None:
    client = warden.connect(warden_daemon.url)
    with pytest.raises(warden.SpecError, match="accelerator"):
        client.Sandbox.create(accel="tcg")
    with pytest.raises(warden.SpecError, match="boot"):
        client.Sandbox.create(boot="warm")
    # boot="cold" is the daemon's too: neither a clone of its boot template nor making one.
    sbx = client.Sandbox.create(memory_mib=128, labels={"t": "remote"}, boot="cold")
    assert isinstance(sbx, warden.Sandbox) and sbx.is_running
    with warden_daemon.client() as c:
        assert sbx.id in [v["id"] for v in c.get("/v1/sandboxes").json()]
    sbx.kill()
    sbx.kill()  # safe twice
    assert not sbx.is_running
    with pytest.raises(warden.SandboxClosedError):
        sbx.commands.run("true")
    with warden_daemon.client() as c:
        assert sbx.id not in [v["id"] for v in c.get("/v1/sandboxes", params={"all": 1}).json()]


async def test_a_daemon_without_an_endpoint_gives_a_clear_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"type": "HTTPError", "message": "Not Found"}})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="http://warden"
    ) as http:
        agent = RemoteAgent(http, RecordPool(Endpoint("unix:///nonexistent.sock")), "vm1")
        with pytest.raises(RemoteUnsupportedError, match=r"files\.list"):
            await agent.list_dir("/")
        with pytest.raises(RemoteUnsupportedError, match="ping"):
            await agent.ping()
        with pytest.raises(RemoteUnsupportedError, match="info"):
            await agent.info()


def test_cp_in_and_out_streams_and_keeps_the_mode(
    warden_daemon: ServeProcess, tmp_path: Path
) -> None:
    host = ["--host", warden_daemon.url]
    data = os.urandom(20 * 1024 * 1024 + 7)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    src.chmod(0o750)
    client = warden.connect(warden_daemon.url)
    with client.create(memory_mib=256) as sbx:
        p = _warden("cp", str(src), f"{sbx.id}:/home/user/in/", *host)
        assert p.returncode == 0, p.stderr
        r = sbx.commands.run("sha256sum /home/user/in/blob.bin; stat -c %a /home/user/in/blob.bin")
        assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
        assert r.stdout.split()[-1] == "750"

        out_dir = tmp_path / "out"
        out_dir.mkdir()
        p = _warden("cp", f"{sbx.id}:/home/user/in/blob.bin", str(out_dir), *host)
        assert p.returncode == 0, p.stderr
        assert (out_dir / "blob.bin").read_bytes() == data

        # stdin and stdout with "-"
        p = _warden("cp", "-", f"{sbx.id}:/tmp/s.txt", *host, stdin=b"via stdin")
        assert p.returncode == 0, p.stderr
        p = _warden("cp", f"{sbx.id}:/tmp/s.txt", "-", *host)
        assert (p.returncode, p.stdout) == (0, b"via stdin")

        # A missing file: a clear error, exit 125, and no partial local file.
        p = _warden("cp", f"{sbx.id}:/no/such", str(tmp_path / "x"), *host)
        assert p.returncode == 125
        assert b"/no/such" in p.stderr
        assert sorted(os.listdir(tmp_path)) == ["blob.bin", "out"]

    p = _warden("cp", str(src), str(tmp_path / "y"), *host)
    assert p.returncode == 2
    assert b"ID:PATH" in p.stderr


def test_run_uses_the_daemon_on_host(warden_daemon: ServeProcess) -> None:
    env = {"WARDEN_HOST": warden_daemon.url}
    proc = subprocess.Popen(
        [
            WARDEN,
            "run",
            "-e",
            "X=42",
            "--",
            "sh",
            "-c",
            "sleep 1; echo x=$X; echo oops >&2; exit 7",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    seen: set[str] = set()
    with warden_daemon.client() as c:
        while proc.poll() is None:
            seen.update(v["id"] for v in c.get("/v1/sandboxes").json())
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out, err) == (7, b"x=42\n", b"oops\n")
        assert len(seen) == 1, "the VM did not run on the daemon"
        assert c.get("/v1/sandboxes", params={"all": 1}).json() == [], "run left its VM"

    data = bytes(range(256)) * 64
    p = _warden("run", "-i", "--", "cat", stdin=data, env=env)
    assert (p.returncode, p.stdout) == (0, data)
    p = _warden("run", "--timeout", "1", "--", "sleep", "100", env=env)
    assert p.returncode == 124 and b"timeout" in p.stderr
    p = _warden("run", "--memory", "0", "--", "true", env=env)
    assert p.returncode == 125 and b"memory_mib" in p.stderr


def test_exec_runs_as_the_user_and_as_root_on_request(warden_daemon: ServeProcess) -> None:
    """Root in the guest only when asked for, and (policy) granted: root on the daemon's
    socket is an admin, whom the default policy grants exec-as-root. A principal without it
    gets a 403: tests/security/test_access_matrix.py."""
    host = ["--host", warden_daemon.url]
    client = warden.connect(warden_daemon.url)
    with client.create(memory_mib=128) as sbx:
        p = _warden("exec", *host, sbx.id, "--", "id", "-u")
        assert (p.returncode, p.stdout) == (0, b"1000\n"), p.stderr
        p = _warden("exec", "--user", "root", *host, sbx.id, "--", "id", "-u")
        assert (p.returncode, p.stdout) == (0, b"0\n"), p.stderr
        p = _warden("cp", "--user", "root", "-", f"{sbx.id}:/etc/x", *host, stdin=b"x")
        assert p.returncode == 0, p.stderr
        p = _warden("exec", *host, sbx.id, "--", "stat", "-c", "%u", "/etc/x")
        assert p.stdout == b"0\n", p.stderr


def test_exec_streams_more_output_than_it_keeps(warden_daemon: ServeProcess) -> None:
    """The CLI keeps nothing of what it streams: 192 MiB through `warden exec` arrive whole,
    and the CLI's peak RSS stays far below that (it held all of it before)."""
    host = ["--host", warden_daemon.url]
    client = warden.connect(warden_daemon.url)
    with client.create(memory_mib=128) as sbx:
        size = 192 * 1024 * 1024
        argv = [WARDEN, "exec", *host, sbx.id, "--", "head", "-c", str(size), "/dev/zero"]
        # A fresh Python runs the CLI as its only child, then reports that child's peak RSS.
        measure = (
            "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "sys.stderr.write(f'\\nmaxrss={resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss}'); sys.exit(code)"
        )
        p = subprocess.run(
            [sys.executable, "-c", measure, *argv], capture_output=True, timeout=300, check=False
        )
        assert p.returncode == 0, p.stderr
        assert len(p.stdout) == size and p.stdout.count(0) == size
    peak_mib = int(p.stderr.rsplit(b"maxrss=", 1)[1]) / 1024
    assert peak_mib < 160, f"warden exec peaked at {peak_mib:.0f} MiB for {size >> 20} MiB"


def test_run_on_a_host_that_does_not_answer_fails(tmp_path: Path) -> None:
    p = _warden("run", "--host", str(tmp_path / "none.sock"), "--", "true")
    assert p.returncode == 125
    assert b"warden serve" in p.stderr


def test_exec_keeps_its_connection_and_renews_a_stale_or_closed_one(
    warden_daemon: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """exec keeps its connection to the daemon alive between commands, across a pause longer
    than uvicorn's default keep-alive (5 s; the daemon's is ``KEEP_ALIVE_S``). The SDK drops
    one idle longer than ``KEEPALIVE_EXPIRY_S`` (before the daemon would close it), and one the
    daemon closed (here: a daemon killed and started again) is noticed and replaced."""
    daemon = warden_daemon
    client = warden.connect(daemon.url)
    with client.Sandbox.create(memory_mib=128) as sbx:
        machine = sbx._inner._machine
        assert isinstance(machine, RemoteMachine)
        pool = machine._lines
        assert sbx.commands.run("echo 1").stdout == "1\n"
        kept = list(pool._idle)
        assert len(kept) == 1
        time.sleep(6)
        assert sbx.commands.run("echo 2").stdout == "2\n"
        assert pool._idle == kept, "the idle connection was not kept for 6 s"

        monkeypatch.setattr(_lines, "KEEPALIVE_EXPIRY_S", 0.5)
        time.sleep(1)
        assert sbx.commands.run("echo 3").stdout == "3\n"
        assert len(pool._idle) == 1 and pool._idle[0] is not kept[0] and not kept[0].alive
        monkeypatch.undo()

        assert daemon.proc is not None
        daemon.proc.kill()  # its connections close with it; the VM outlives it
        daemon.proc.wait()
        daemon.start()
        assert sbx.commands.run("echo 4").stdout == "4\n"

        # and many at once: one connection each, all kept for the next round
        async def burst() -> list[str]:
            remote = sbx._inner
            runs = (remote.commands.run(f"echo {i}") for i in range(8))
            return [r.stdout for r in await asyncio.gather(*runs)]

        assert _portal.call(burst()) == [f"{i}\n" for i in range(8)]
        assert _portal.call(burst()) == [f"{i}\n" for i in range(8)]
