"""``require_jail`` per VM: ``Sandbox.create(require_jail=True)``/``AsyncSandbox.create(...)``
embedded and through a daemon (``client.Sandbox.create``), and ``warden create --require-jail``.

This host has every jail feature, so there ``require_jail=True`` boots a real VM. A host that
lacks one is a fake: the feature check (``features.detect``) is monkeypatched to say PID
namespaces are missing, because taking a feature away for real would take it from the other
tests running here too. Refused, nothing is left: no QEMU, runtime dir, uid claim
(``$WARDEN_HOME/run/uids``) or, on the daemon, row or event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import warden
from tests.conftest import qemu_pids
from warden.cli import main as cli_main
from warden.config import Paths
from warden.jail import features, ids, policy
from warden.jail.policy import JailUnavailableError
from warden.server import Manager, create_app
from warden.vmm.machine import Machine

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root"),
]

FAKED = "faked for a test"
MEMORY = 128

Leftovers = tuple[set[int], set[str], dict[int, str]]


def _leftovers(paths: Paths) -> Leftovers:
    """The QEMUs of warden VMs (of this home and the real one), and ``paths``' runtime dirs
    and uid claims."""
    dirs = {p.name for p in paths.vms.iterdir()} if paths.vms.is_dir() else set()
    return qemu_pids() | _qemus(paths), dirs, ids.claimed(paths.vms)


def _qemus(paths: Paths) -> set[int]:
    """Pids of the processes whose argv names a runtime dir of ``paths``."""
    marker = str(paths.vms).encode()
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
    return pids


def _assert_refused(error: pytest.ExceptionInfo[JailUnavailableError]) -> None:
    message = str(error.value)
    assert f"pid ns: {FAKED}" in message, message
    assert "warden doctor" in message and "require" in message, message


@pytest.fixture
def host_without_pid_ns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake (this host has every feature): the feature check says it cannot make PID
    namespaces. The process-wide jail mode stays ``on``: only ``require_jail`` may refuse."""
    real = features.detect

    def detect(*args: object, **kwargs: object) -> features.HostFeatures:
        host = real(*args, **kwargs)  # type: ignore[arg-type]
        return features.HostFeatures({**host.missing, features.PID: FAKED})

    monkeypatch.setattr(features, "detect", detect)
    monkeypatch.setattr(policy, "_default", "on")
    yield


# -- embedded ------------------------------------------------------------------------------


def test_require_jail_boots_when_the_host_has_every_feature(no_leaks: None) -> None:
    with warden.Sandbox.create(memory_mib=MEMORY, require_jail=True) as sbx:
        machine = sbx._inner._machine
        assert isinstance(machine, Machine)
        assert machine.jail_mode == "require"
        assert machine.jail is not None and machine.jail.missing == {}
        assert machine.uid is not None and ids.in_range(machine.uid)
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    assert policy.default_mode() == "on", "require_jail changed the process-wide mode"


def test_embedded_require_jail_refuses_a_partial_jail_and_leaves_nothing(
    host_without_pid_ns: None,
) -> None:
    paths = Paths.from_env()
    before = _leftovers(paths)
    with pytest.raises(JailUnavailableError) as sync_error:
        warden.Sandbox.create(memory_mib=MEMORY, require_jail=True)
    _assert_refused(sync_error)
    with pytest.raises(JailUnavailableError) as async_error:
        asyncio.run(warden.AsyncSandbox.create(memory_mib=MEMORY, require_jail=True))
    _assert_refused(async_error)
    assert isinstance(async_error.value, warden.HostError)
    assert _leftovers(paths) == before
    assert policy.default_mode() == "on"


# -- through a daemon ----------------------------------------------------------------------


def _private_home(tmp: Path) -> Paths:
    """A $WARDEN_HOME of its own (its store, runtime dirs and uid claims), sharing the real
    one's built images and caches (not its templates: another seal key)."""
    real = Paths.from_env()
    home = tmp / "home"
    home.mkdir()
    for name in ("cache", "images"):
        (real.home / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / name).symlink_to(real.home / name)
    return Paths(home)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Paths]]:
    """The daemon's app in this process (uvicorn in a thread, on a unix socket), so that the
    faked feature check applies to it: its url and its home."""
    import uvicorn

    paths = _private_home(tmp_path)
    path = tmp_path / "w.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(create_app(Manager(paths)), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        yield f"unix://{path}", paths
    finally:
        with _http(f"unix://{path}") as c:
            for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive()


def _http(url: str) -> httpx.Client:
    uds = url.removeprefix("unix://")
    transport = httpx.HTTPTransport(uds=uds)
    return httpx.Client(transport=transport, base_url="http://warden", timeout=120)


def _nothing_recorded(url: str, paths: Paths, before: Leftovers) -> None:
    assert _leftovers(paths) == before
    with _http(url) as c:
        assert c.get("/v1/sandboxes", params={"all": "true"}).json() == []
        assert c.get("/v1/events").json() == [], "a refused create was recorded"


def test_daemon_require_jail_refuses_a_partial_jail_and_records_nothing(
    host_without_pid_ns: None, daemon: tuple[str, Paths]
) -> None:
    url, paths = daemon
    before = _leftovers(paths)
    with _http(url) as c:
        r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY, "require_jail": True})
    assert r.status_code == 409, r.text
    detail = r.json()["error"]["message"]
    assert detail.startswith("the jail is required") and f"pid ns: {FAKED}" in detail
    client = warden.connect(url)
    with pytest.raises(JailUnavailableError) as sync_error:
        client.Sandbox.create(memory_mib=MEMORY, require_jail=True)
    _assert_refused(sync_error)
    with pytest.raises(JailUnavailableError) as async_error:
        asyncio.run(client.AsyncSandbox.create(memory_mib=MEMORY, require_jail=True))
    _assert_refused(async_error)
    _nothing_recorded(url, paths, before)


def test_cli_create_require_jail_asks_the_daemon_to_refuse(
    host_without_pid_ns: None, daemon: tuple[str, Paths]
) -> None:
    url, paths = daemon
    before = _leftovers(paths)
    args = ["create", "--memory", str(MEMORY), "--host", url]
    refused = CliRunner().invoke(cli_main.app, [*args, "--require-jail"])
    assert refused.exit_code == cli_main.EXIT_WARDEN_ERROR, refused.output
    assert "HTTP 409" in refused.output and FAKED in refused.output, refused.output
    _nothing_recorded(url, paths, before)
    # Without the flag the same host boots it, in a partial jail (a logged downgrade).
    created = CliRunner().invoke(cli_main.app, args)
    assert created.exit_code == 0, created.output
    vm_id = created.output.strip()
    with _http(url) as c:
        assert c.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "running"
    removed = CliRunner().invoke(cli_main.app, ["rm", "-f", vm_id, "--host", url])
    assert removed.exit_code == 0, removed.output
    assert _leftovers(paths) == before


def test_a_daemon_with_require_jail_refuses_every_create_the_same_way(
    host_without_pid_ns: None, daemon: tuple[str, Paths], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, paths = daemon
    before = _leftovers(paths)
    monkeypatch.setattr(policy, "_default", "require")  # what `warden serve --require-jail` sets
    with _http(url) as c:
        r = c.post("/v1/sandboxes", json={"memory_mib": MEMORY})
    assert r.status_code == 409 and f"pid ns: {FAKED}" in r.json()["error"]["message"], r.text
    _nothing_recorded(url, paths, before)
