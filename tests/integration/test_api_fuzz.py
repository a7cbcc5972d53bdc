"""A bounded schemathesis run against the served OpenAPI spec: no request gets a 5xx.

The daemon's app runs in this process (uvicorn on 127.0.0.1, in a thread with its own event
loop) over a Manager with a private $WARDEN_HOME, which shares the built images of the real
one (not its templates: another seal key), and a small host capacity, so fuzzed creates boot
at most a few small VMs. One VM is made first and most fuzzed requests name it, so the fuzzed
values reach its guest agent (safe: the private home's policy.toml denies exec-as-root to
everyone, so they run as the guest's unprivileged user or get a 403); the requests that would
stop or remove it keep their fuzzed ref. Every VM is removed at the end.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from warden.config import Paths
from warden.policy.access import policy_path
from warden.policy.admission import AdmissionPolicy, HostCapacity
from warden.server import Manager, create_app
from warden.vmm.spec import MIN_MEMORY_MIB

pytestmark = pytest.mark.vm

MAX_EXAMPLES = 8
MEMORY = max(128, MIN_MEMORY_MIB)
NO_ROOT = """
[[rules]]
name = "admin"
roles = ["admin"]
actions = ["*"]
on = ["sandboxes", "daemon"]

[[rules]]
name = "no-root-in-fuzzed-guests"
effect = "deny"
roles = ["*"]
actions = ["exec-as-root"]
"""
KEEP_REF = {("DELETE", "/v1/sandboxes/{ref}"), ("POST", "/v1/sandboxes/{ref}/stop")}
"""The operations whose fuzzed ref is kept: with the VM's id they would end it."""


def _private_home(tmp: Path) -> Paths:
    real = Paths.from_env()
    home = tmp / "home"
    home.mkdir()
    for name in ("cache", "images"):
        (real.home / name).mkdir(mode=0o700, parents=True, exist_ok=True)  # never dangle
        (home / name).symlink_to(real.home / name)
    return Paths(home)


@pytest.fixture(scope="module")
def api_schema(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    import uvicorn

    paths = _private_home(tmp_path_factory.mktemp("fuzz"))
    policy_path(paths).write_text(NO_ROOT)
    manager = Manager(
        paths,
        policy=AdmissionPolicy(reserved_host_memory_mib=0),
        capacity=HostCapacity(memory_mib=2 * (MEMORY + AdmissionPolicy().vm_overhead_mib), cpus=2),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(manager), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        with httpx.Client(base_url=base, timeout=120) as c:
            r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY})
            assert r.status_code == 201, r.text
        yield schemathesis.openapi.from_url(f"{base}/openapi.json"), r.json()["id"]
    finally:
        with httpx.Client(base_url=base, timeout=60) as c:
            for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
            assert c.get("/v1/sandboxes", params={"all": "true"}).json() == []
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive()
        left = list(paths.vms.iterdir()) if paths.vms.is_dir() else []
        assert left == [], f"VM runtime dirs left behind: {left}"


def test_no_server_errors(api_schema: tuple[schemathesis.BaseSchema, str]) -> None:
    schema, vm_id = api_schema
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            if case.path_parameters and (case.method, case.operation.path) not in KEEP_REF:
                case.path_parameters["ref"] = vm_id
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200} -> "
                    f"{response.status_code}: {response.text[:300]}"
                )

        run()
    assert operations >= 14
    assert failures == []
