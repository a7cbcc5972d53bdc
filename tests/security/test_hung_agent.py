"""A frozen guest agent marks its VM unhealthy within a deadline; nothing hangs; rm still works.

The guest is frozen from the host: SIGSTOP of the VM's QEMU process stops the guest, its agent
and its devices at once (what a root workload ptrace-attaching the agent does to the agent
alone). The agent client's liveness ping then goes unanswered, the connection is aborted, and
the daemon marks the VM ``unhealthy`` with the reason. Against the real daemon (ServeProcess).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import warden
from tests.integration.conftest import ServeProcess, serving
from warden._errors import WardenError
from warden.agent.client import PING_INTERVAL_S, PING_TIMEOUT_S
from warden.vmm import ownership

pytestmark = pytest.mark.vm

UNHEALTHY_WITHIN_S = PING_INTERVAL_S + PING_TIMEOUT_S + 25.0
"""A ping is sent at most PING_INTERVAL_S after the freeze and given up PING_TIMEOUT_S later
(15 s in all); 25 s more for a loaded host."""
FAIL_FAST_S = 5.0
"""How long a new call to an unhealthy VM may take to be refused (it must not wait)."""
RM_WITHIN_S = 30.0
"""QMP quit (3 s), the wait for QEMU (3 s), then SIGKILL: with a wide margin."""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(tmp_path) as d:
        yield d


def _inspect(http: httpx.Client, vm_id: str) -> dict[str, Any]:
    r = http.get(f"/v1/sandboxes/{vm_id}")
    assert r.status_code == 200, r.text
    vm = r.json()
    assert isinstance(vm, dict)
    return vm


def _wait_unhealthy(http: httpx.Client, vm_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + UNHEALTHY_WITHIN_S
    while True:
        vm = _inspect(http, vm_id)
        if vm["state"] != "running" or time.monotonic() > deadline:
            return vm
        time.sleep(0.25)


def test_a_frozen_agent_marks_the_vm_unhealthy_and_rm_still_works(daemon: ServeProcess) -> None:
    client = warden.connect(daemon.url)
    sbx = client.Sandbox.create(memory_mib=128)
    with daemon.client() as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pid = _inspect(http, sbx.id)["pid"]
        assert isinstance(pid, int) and ownership.is_alive(pid, None)
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        busy = pool.submit(sbx.commands.run, "sleep 600")  # in flight when the guest freezes
        time.sleep(1.0)
        frozen_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            vm = _wait_unhealthy(http, sbx.id)
            assert vm["state"] == "unhealthy", vm
            assert time.monotonic() - frozen_at <= UNHEALTHY_WITHIN_S
            assert vm["error"] and "did not answer" in vm["error"], vm
            listed = {v["id"]: v for v in http.get("/v1/sandboxes").json()}
            assert listed[sbx.id]["state"] == "unhealthy"  # `warden ps` shows it
            # The call that was waiting on the agent ends with an error instead of hanging.
            with pytest.raises(WardenError):
                busy.result(timeout=FAIL_FAST_S)
            # A new call is refused at once, saying why.
            started = time.monotonic()
            r = http.post(f"/v1/sandboxes/{sbx.id}/exec", json={"cmd": "true"})
            assert time.monotonic() - started < FAIL_FAST_S
            assert r.status_code == 409, r.text
            assert "unhealthy" in r.json()["error"]["message"]
            started = time.monotonic()
            r = http.delete(f"/v1/sandboxes/{sbx.id}", params={"force": "true"})
            assert r.status_code == 204, r.text
            assert time.monotonic() - started < RM_WITHIN_S
        finally:
            if ownership.is_alive(pid, None):
                os.kill(pid, signal.SIGCONT)
        assert not ownership.is_alive(pid, None), "rm left the frozen QEMU running"
        assert http.get(f"/v1/sandboxes/{sbx.id}").status_code == 404
