"""The warm pool of a daemon (``warden serve --pool T=K``): ready clones, hidden from ``ps``
but shown by ``ps --all``, handed to creates of their template and refilled, never past
admission."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import warden
from warden.config import Paths
from warden.vmm.templates import Templates

from .conftest import ServeProcess, serving

pytestmark = pytest.mark.vm

POOL_LABEL = "warden.pool"


@pytest.fixture(scope="module")
def template() -> Iterator[str]:
    name = f"pool-{secrets.token_hex(3)}"
    with warden.Sandbox.create() as sbx:
        sbx.commands.run("echo warm > /home/user/pooled")
        sbx.save_template(name)
    yield name
    Templates(Paths.from_env()).remove(name)


def _pools(d: ServeProcess) -> dict[str, Any]:
    with d.client() as c:
        info: dict[str, Any] = c.get("/v1/info").json()
    pools: dict[str, Any] = info["pools"]
    return pools


def _wait_ready(d: ServeProcess, name: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = _pools(d).get(name, {})
        if pool.get("ready") == count and pool.get("filling") == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"pool {name} never had {count} ready: {_pools(d)}\n{d.log_tail()}")


def _vms(d: ServeProcess, *, all: bool) -> list[dict[str, Any]]:
    with d.client() as c:
        rows: list[dict[str, Any]] = c.get("/v1/sandboxes", params={"all": str(all).lower()}).json()
    return [r for r in rows if r["state"] == "running"]


def test_creates_take_ready_clones_and_the_pool_refills(tmp_path: Path, template: str) -> None:
    with serving(tmp_path, "--pool", f"{template}=2") as d:
        _wait_ready(d, template, 2)
        members = {r["id"] for r in _vms(d, all=True) if r["labels"].get(POOL_LABEL)}
        assert len(members) == 2
        assert not _vms(d, all=False), "ps shows pool members"
        client = warden.connect(d.url)
        with client.Sandbox.create(template=template, labels={"who": "me"}) as sbx:
            assert sbx.id in members
            assert sbx.commands.run("cat /home/user/pooled").stdout == "warm\n"
            shown = {r["id"]: r for r in _vms(d, all=False)}
            assert list(shown) == [sbx.id] and shown[sbx.id]["labels"] == {"who": "me"}
            _wait_ready(d, template, 2)
            refilled = {r["id"] for r in _vms(d, all=True) if r["labels"].get(POOL_LABEL)}
            assert len(refilled) == 2 and sbx.id not in refilled
        with pytest.raises(warden.SpecError, match="warden's"):
            client.Sandbox.create(template=template, labels={POOL_LABEL: template})


def test_the_pool_never_refills_past_admission(tmp_path: Path, template: str) -> None:
    # Two vCPUs admitted in all: a pool of 3 gets 2 members, and a create that takes one
    # leaves the pool short, since refilling would pass the limit.
    args = ("--charge", "limits", "--vcpu-overcommit", "1", "--pool", f"{template}=3")
    with serving(tmp_path, *args) as d:
        _wait_ready(d, template, 2)
        time.sleep(6)  # past a refill's retry: still 2
        assert _pools(d)[template]["ready"] == 2
        assert len(_vms(d, all=True)) == 2
        client = warden.connect(d.url)
        with client.Sandbox.create(template=template) as sbx:
            time.sleep(6)
            assert len(_vms(d, all=True)) == 2, "the pool refilled past admission"
            assert _pools(d)[template]["ready"] == 1
            assert sbx.commands.run("true").exit_code == 0
        _wait_ready(d, template, 2)
        assert len(_vms(d, all=True)) == 2
