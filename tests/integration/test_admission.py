"""Admission with charges by measured use (``warden serve --charge measured``, the default)
against a real daemon: parallel creates at the limit admit exactly as many as fit and leave
no trace of the others, and a host whose VMs keep its CPUs busy refuses creates with 409."""

from __future__ import annotations

import concurrent.futures
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import qemu_pids, runtime_dirs
from tests.integration.conftest import ServeProcess
from warden.config import Paths
from warden.policy.admission import HostCapacity
from warden.store.db import Store, db_path

pytestmark = pytest.mark.vm

MEMORY = 128
FOOTPRINT = 200
"""The footprint given to the daemon (--vm-footprint, no headroom): what it charges a VM it
has not measured yet, below the VM's limit (128 + 320 MiB)."""


def _daemon(tmp_path: Path, *args: str) -> ServeProcess:
    return ServeProcess(
        tmp_path / "w.sock",
        tmp_path / "daemon.log",
        args=["--log-level", "warning", "--vm-footprint", str(FOOTPRINT), *args],
    )


def _leftover_charge() -> int:
    """What the active rows of earlier runs in this shared $WARDEN_HOME are charged (none of
    them is measured by a new daemon)."""
    with Store(db_path(Paths.from_env())) as store:
        held = store.reservations()
    return sum(min(vm.memory_mib + 320, FOOTPRINT) for vm in held.active)


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in {text}")


def test_parallel_creates_at_the_limit_admit_exactly_n(tmp_path: Path, no_leaks: None) -> None:
    n, k = 3, 3
    host = HostCapacity.from_host()
    limit = _leftover_charge() + n * FOOTPRINT + FOOTPRINT // 2
    d = _daemon(
        tmp_path,
        "--vm-headroom",
        "0",
        "--memory-overcommit",
        "1",
        "--reserved-memory",
        str(host.memory_mib - limit),
        "--vcpu-overcommit",
        "64",
        "--cpu-busy-limit",
        "64",
    )
    d.start()
    try:
        with d.client() as c:
            info = c.get("/v1/info").json()
            assert info["limits"]["memory_mib"] == limit
            assert info["policy"]["charge"] == "measured"
            assert info["policy"]["vm_footprint_mib"] == FOOTPRINT
            dirs, pids = runtime_dirs(), qemu_pids()
            last = _last_event_id(c)
            tag = secrets.token_hex(3)
            barrier = threading.Barrier(n + k)

            def create(i: int) -> httpx.Response:
                with d.client() as own:
                    barrier.wait()
                    body = {"memory_mib": MEMORY, "name": f"par-{tag}-{i}"}
                    return own.post("/v1/sandboxes", json=body)

            with concurrent.futures.ThreadPoolExecutor(n + k) as pool:
                answers = list(pool.map(create, range(n + k)))
            codes = sorted(r.status_code for r in answers)
            assert codes == [201] * n + [409] * k, [r.text for r in answers]
            admitted = {r.json()["id"] for r in answers if r.status_code == 201}
            refused = [i for i, r in enumerate(answers) if r.status_code == 409]
            for i in refused:
                assert "memory:" in answers[i].json()["error"]["message"]
                assert c.get(f"/v1/sandboxes/par-{tag}-{i}").status_code == 404
            listed = {v["id"] for v in c.get("/v1/sandboxes", params={"all": "true"}).json()}
            assert listed == admitted
            assert runtime_dirs() - dirs == admitted and len(qemu_pids() - pids) == n
            names = {
                e["detail"]["name"]
                for e in _events_after(c, last)
                if e["kind"] == "created" and str(e["detail"].get("name")).startswith(f"par-{tag}")
            }
            assert names == {f"par-{tag}-{i}" for i in range(n + k) if i not in refused}
            metrics = c.get("/metrics").text
            assert _metric(metrics, 'warden_admission_refusals_by_limit_total{limit="memory"}') == k
    finally:
        d.stop()


def test_a_host_whose_vms_keep_the_cpus_busy_refuses_creates(
    tmp_path: Path, no_leaks: None
) -> None:
    """A VM spinning in a loop uses about one CPU under TCG; with cpu_busy_limit 0.2 (of the
    host's CPUs) the next create is refused with 409 once that load is measured, and the
    refusal leaves nothing and is counted under its limit."""
    d = _daemon(tmp_path, "--cpu-busy-limit", "0.2")
    d.start()
    try:
        with d.client() as c:
            r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY})
            assert r.status_code == 201, r.text
            vm_id = r.json()["id"]
            spin = threading.Thread(
                target=lambda: _exec(d, vm_id, "timeout 25 sh -c 'while :; do :; done'"),
                daemon=True,
            )
            spin.start()
            host = HostCapacity.from_host()
            deadline = time.monotonic() + 30
            load = 0.0
            while time.monotonic() < deadline and load <= 0.2 * host.cpus:
                time.sleep(1)
                load = c.get("/v1/info").json()["reservations"]["measured_cpu_load"]
            assert load > 0.2 * host.cpus, f"the spinning VM was measured at {load}"
            dirs, pids = runtime_dirs(), qemu_pids()
            refused = c.post("/v1/sandboxes", json={"memory_mib": MEMORY, "name": "busy"})
            assert refused.status_code == 409, refused.text
            assert "cpu_busy_limit" in refused.json()["error"]["message"]
            assert c.get("/v1/sandboxes/busy").status_code == 404
            assert runtime_dirs() == dirs and qemu_pids() == pids
            metrics = c.get("/metrics").text
            assert (
                _metric(metrics, 'warden_admission_refusals_by_limit_total{limit="cpu_busy"}') == 1
            )
            spin.join(timeout=40)
    finally:
        d.stop()


def _last_event_id(c: httpx.Client) -> int:
    """The id of the newest event: the shared store may hold many earlier ones."""
    start = 0
    while page := c.get("/v1/events", params={"after": start}).json():
        start = page[-1]["id"]
    return start


def _events_after(c: httpx.Client, after: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while page := c.get("/v1/events", params={"after": after}).json():
        events += page
        after = page[-1]["id"]
    return events


def _exec(d: ServeProcess, vm_id: str, line: str) -> None:
    with (
        d.client() as c,
        c.stream("POST", f"/v1/sandboxes/{vm_id}/exec", json={"cmd": line, "timeout": 30}) as r,
    ):
        for _ in r.iter_bytes():
            pass
