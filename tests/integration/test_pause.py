"""Pause and resume (a sealed saved state, QEMU ended) and auto-pause (QMP stop when idle).

Embedded tests drive a Machine; the daemon tests go through the REST API, the CLI and the
SDK, and kill -9 the daemon while a VM is paused. Tampering: tests/security/test_sealed_pause.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import warden
from tests.conftest import qemu_pids
from tests.integration.conftest import WARDEN, ServeProcess
from tests.integration.test_daemon import Daemon, _create, _exec
from warden._errors import SandboxClosedError, StateTransitionError
from warden.config import Paths
from warden.vmm import ownership
from warden.vmm.machine import Machine
from warden.vmm.pause import PausedStates
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState
from warden.vmm.templates import Templates

pytestmark = pytest.mark.vm

COUNTER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; "
    "mv /tmp/counter.new /tmp/counter; sleep 0.2; done' >/dev/null 2>&1 </dev/null & echo $!"
)
"""A background process that counts into /tmp/counter five times a second; prints its pid.
Each count is renamed into place: a reader never sees the file empty (``>`` truncates it
first, and a CI run read it in between)."""
COUNTED = "for i in $(seq 50); do [ -s /tmp/counter ] && exit 0; sleep 0.1; done; exit 1"
"""Exits 0 once the counter has written /tmp/counter, within 5 s."""


async def _run(machine: Machine, cmd: str) -> str:
    result = await machine.agent.exec(["sh", "-c", cmd])
    assert result.exit_code == 0, result
    return result.stdout.decode()


async def _status(machine: Machine) -> str:
    assert machine._qmp is not None
    status = await machine._qmp.execute("query-status")
    assert isinstance(status, dict)
    return str(status["status"])


def _state(machine: Machine) -> VMState:
    return machine.state


def _guest_clock_error(out: str) -> float:
    return abs(float(out.strip().splitlines()[-1]) - time.time())


def test_pause_then_resume_keeps_a_running_process_and_its_files(no_leaks: None) -> None:
    async def main() -> None:
        machine = Machine(VMSpec.parse())
        await machine.launch()
        try:
            pid = (await _run(machine, COUNTER)).strip()
            await machine.agent.write_file("/home/user/kept", b"my file")
            await asyncio.sleep(1.0)
            before = int(await _run(machine, "cat /tmp/counter"))
            qemu = machine.pid
            await machine.pause()
            assert _state(machine) is VMState.PAUSED and machine.pid is None
            assert qemu is not None and not ownership.is_alive(qemu, None), "QEMU still runs"
            assert PausedStates(machine.paths).path(machine.id).is_file()
            with pytest.raises(StateTransitionError, match="paused"):
                await machine.pause()
            with pytest.raises(StateTransitionError, match="resume it first"):
                await machine.agent.exec(["true"])
            await asyncio.sleep(3.0)  # a clock that stood still would be 3 s late
            await machine.resume()
            assert _state(machine) is VMState.RUNNING and machine.pid not in (None, qemu)
            assert not PausedStates(machine.paths).path(machine.id).exists()
            out = await _run(machine, f"cat /tmp/counter; kill -0 {pid} && echo alive; date +%s.%N")
            after, alive = out.split()[:2]
            assert int(after) >= before and alive == "alive"
            assert _guest_clock_error(out) < 1.5, f"the guest clock was not corrected: {out}"
            await asyncio.sleep(1.0)
            assert int(await _run(machine, "cat /tmp/counter")) > int(after), "it stopped counting"
            assert await machine.agent.read_file_bytes("/home/user/kept") == b"my file"
            with pytest.raises(StateTransitionError, match="only a paused VM"):
                await machine.resume()
        finally:
            await machine.shutdown()
        assert not (Paths.from_env().paused / machine.id).exists()

    asyncio.run(main())


def test_a_paused_vm_is_stopped_and_cleaned_up(no_leaks: None) -> None:
    async def main() -> None:
        machine = Machine(VMSpec.parse())
        await machine.launch()
        try:
            await machine.pause()
        finally:
            await machine.shutdown()
        assert machine.state is VMState.STOPPED
        assert not (Paths.from_env().paused / machine.id).exists()
        assert machine.channel_keys.current(machine.id) is None

    asyncio.run(main())


def test_auto_pause_stops_an_idle_vm_and_resumes_on_exec_files_and_ping(
    no_leaks: None,
) -> None:
    async def idle_until_stopped(machine: Machine) -> None:
        deadline = time.monotonic() + 10
        while await _status(machine) != "paused":
            assert time.monotonic() < deadline, "the idle VM was not stopped"
            await asyncio.sleep(0.1)
        assert machine.idle.stopped

    async def main() -> None:
        machine = Machine(VMSpec.parse(), auto_pause_s=0.5)
        await machine.launch()
        try:
            await idle_until_stopped(machine)
            await asyncio.sleep(2.0)  # stopped: a clock that stood still would be late
            out = await _run(machine, "date +%s.%N")
            assert await _status(machine) == "running" and machine.idle.conts == 1
            assert _guest_clock_error(out) < 1.0, f"the guest clock was not corrected: {out}"
            await idle_until_stopped(machine)
            await machine.agent.write_file("/home/user/f", b"written while stopped")
            await idle_until_stopped(machine)
            assert await machine.agent.read_file_bytes("/home/user/f") == b"written while stopped"
            await idle_until_stopped(machine)
            await machine.agent.ping()
            assert machine.idle.conts == 4
            # A request that arrives while the stop is under way still gets an answer.
            await idle_until_stopped(machine)
            results = await asyncio.gather(*(machine.agent.ping() for _ in range(5)))
            assert len(results) == 5
            await idle_until_stopped(machine)
            await machine.pause()  # a paused-to-disk VM can come from an idle-stopped one
            await machine.resume()
            assert (await _run(machine, "cat /home/user/f")) == "written while stopped"
        finally:
            await machine.shutdown()

    asyncio.run(main())


def test_busy_vm_is_not_stopped_and_cannot_be_paused_mid_command(no_leaks: None) -> None:
    async def main() -> None:
        machine = Machine(VMSpec.parse(), auto_pause_s=0.3)
        await machine.launch()
        try:
            command = asyncio.create_task(_run(machine, "sleep 1.5; echo done"))
            await asyncio.sleep(0.8)
            assert await _status(machine) == "running", "a VM with a command in flight stopped"
            with pytest.raises(StateTransitionError, match="in flight"):
                await machine.pause()
            assert await command == "done\n"
        finally:
            await machine.shutdown()

    asyncio.run(main())


def test_embedded_sdk_pause_and_resume(no_leaks: None) -> None:
    with warden.Sandbox.create() as sbx:
        sbx.files.write("/home/user/sdk", "kept")
        sbx.pause()
        assert sbx.state == "paused"
        with pytest.raises(SandboxClosedError, match="paused"):
            sbx.commands.run("true")
        again = warden.Sandbox.resume(sbx.id)
        assert again.commands.run("cat /home/user/sdk").stdout == "kept"


# -- the daemon ------------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, no_leaks: None) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "w.sock", tmp_path / "daemon.log", ("--auto-pause", "1"))
    d.start()
    try:
        yield d
    finally:
        if d.proc is None:
            d.start()
        with d.client() as c:
            for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
        d.stop()


def test_daemon_pause_resume_survives_kill_9(daemon: Daemon) -> None:
    with daemon.client() as c:
        vm = _create(c)
        vm_id, pid = vm["id"], vm["pid"]
        out, _, _ = _exec(c, vm_id, COUNTER)
        counter_pid = out.decode().strip()
        # Pause only once the counter has counted: a pause straight after the exec can catch
        # it before its first write, and the first command after resume can run before it.
        _, _, counted = _exec(c, vm_id, COUNTED)
        assert counted["exit_code"] == 0, "the counter never wrote /tmp/counter"
        assert c.post(f"/v1/sandboxes/{vm_id}/resume").status_code == 409
        r = c.post(f"/v1/sandboxes/{vm_id}/pause")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "paused" and r.json()["pid"] is None
        assert pid not in qemu_pids()
        assert c.post(f"/v1/sandboxes/{vm_id}/pause").status_code == 409
        r = c.post(f"/v1/sandboxes/{vm_id}/exec", json={"cmd": ["true"]})
        assert r.status_code == 409 and "resume" in r.text
        listed = c.get("/v1/sandboxes").json()
        assert [(v["id"], v["state"]) for v in listed] == [(vm_id, "paused")]

    daemon.signal(signal.SIGKILL)
    daemon.start()
    with daemon.client() as c:
        row = c.get(f"/v1/sandboxes/{vm_id}").json()
        assert row["state"] == "paused", (row["error"], daemon.log_tail())
        r = c.post(f"/v1/sandboxes/{vm_id}/resume")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "running"
        out, err, final = _exec(c, vm_id, f"kill -0 {counter_pid} && cat /tmp/counter")
        assert final["exit_code"] == 0 and int(out) > 0, (final, out, err)
        # A paused VM is removed with its saved state.
        assert c.post(f"/v1/sandboxes/{vm_id}/pause").status_code == 200
        assert (Paths.from_env().paused / vm_id).is_dir()
        assert c.delete(f"/v1/sandboxes/{vm_id}").status_code == 409
        assert c.delete(f"/v1/sandboxes/{vm_id}", params={"force": "true"}).status_code == 204
        assert not (Paths.from_env().paused / vm_id).exists()


def test_daemon_auto_pause_shows_in_ps_and_resumes_on_requests(daemon: Daemon) -> None:
    with daemon.client() as c:
        vm_id = _create(c)["id"]
        _wait_idle_paused(c, vm_id)
        out, _, _ = _exec(c, vm_id, "echo awake")
        assert out == b"awake\n"
        _wait_idle_paused(c, vm_id)
        r = c.put(f"/v1/sandboxes/{vm_id}/files", params={"path": "/home/user/x"}, content=b"x")
        assert r.is_success, r.text
        _wait_idle_paused(c, vm_id)
        assert c.post(f"/v1/sandboxes/{vm_id}/ping").status_code == 200
        _wait_idle_paused(c, vm_id)
    table = subprocess.run(
        [WARDEN, "ps", "--host", daemon.url], capture_output=True, text=True, check=True
    ).stdout
    assert "idle-paused" in table
    for action, state in (("pause", "paused"), ("resume", "running")):
        subprocess.run([WARDEN, action, vm_id, "--host", daemon.url], check=True)
        with daemon.client() as c:
            assert c.get(f"/v1/sandboxes/{vm_id}").json()["state"] == state


def test_remote_sdk_pause_and_resume(daemon: ServeProcess) -> None:
    client = warden.connect(daemon.url)
    sbx = client.Sandbox.create(memory_mib=128)
    try:
        sbx.files.write("/home/user/r", "remote")
        sbx.pause()
        assert sbx.state == "paused"
        again = client.Sandbox.resume(sbx.id)
        assert again.commands.run("cat /home/user/r").stdout == "remote"
    finally:
        sbx.kill()


def _wait_idle_paused(c: object, vm_id: str) -> None:
    import httpx

    assert isinstance(c, httpx.Client)
    deadline = time.monotonic() + 15
    while not c.get(f"/v1/sandboxes/{vm_id}").json()["idle_paused"]:
        assert time.monotonic() < deadline, "the idle VM was not stopped"
        time.sleep(0.1)


def test_a_clone_pauses_and_resumes(no_leaks: None) -> None:
    """A clone's RAM is its template's memfd, mapped private; its saved state must still hold
    its whole RAM (its own writes), and load into a plain QEMU."""
    name = "pause-test-clone"

    async def main() -> None:
        base = Machine(VMSpec.parse())
        await base.launch()
        try:
            await base.save_template(name, keep_running=False)
        finally:
            await base.shutdown()
        clone = Machine(VMSpec.parse(template=name))
        try:
            await clone.launch()
            assert clone.booted_from == "template"
            await clone.agent.write_file("/home/user/c", b"the clone's own")
            await clone.pause()
            await clone.resume()
            assert await clone.agent.read_file_bytes("/home/user/c") == b"the clone's own"
            assert (await _run(clone, "hostname")).strip() == clone.id
        finally:
            await clone.shutdown()
            Templates(clone.paths).remove(name)

    asyncio.run(main())
