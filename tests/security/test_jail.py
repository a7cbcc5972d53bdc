"""Every QEMU runs in a jail (docs/security.md, "The jail"), checked on real VMs under TCG.

A running QEMU has a uid of warden's range, no capability, no_new_privs, seccomp's filter
mode, an empty environment, namespaces of its own (mount, PID, network: no interface but
loopback), only its own files in its root, and its rlimits; one VM's uid cannot read another
VM's runtime dir (tried as that uid in a forked child). ``--require-jail`` on a host that lacks
a feature refuses and leaves nothing behind; that host is faked by monkeypatching the feature
check (this host has every feature, and taking one away for real would take it from the other
tests running here too).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import warden
from tests.conftest import qemu_pids, runtime_dirs
from tests.integration.conftest import ServeProcess, serving
from warden.cli import main as cli_main
from warden.cli import serve as cli_serve
from warden.config import Paths
from warden.jail import features, ids, policy, spawn
from warden.jail.policy import JailUnavailableError
from warden.vmm import cgroups
from warden.vmm.machine import Machine

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root"),
]

QEMU_ENV_WARDEN_SETS = b""
"""What warden puts in QEMU's environment: nothing."""


def _machine(sbx: warden.Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)
    return machine


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.fixture
def two_vms(no_leaks: None) -> Iterator[tuple[Machine, Machine]]:
    with warden.Sandbox.create(memory_mib=128) as a, warden.Sandbox.create(memory_mib=128) as b:
        yield _machine(a), _machine(b)


def test_qemu_runs_unprivileged_sandboxed_and_alone(two_vms: tuple[Machine, Machine]) -> None:
    machine = two_vms[0]
    pid = machine.pid
    assert pid is not None and machine.jail is not None and machine.uid is not None
    status = _status(pid)
    assert status["Name"].startswith("qemu-system")
    uids, gids = status["Uid"].split(), status["Gid"].split()
    assert uids == [str(machine.uid)] * 4 and gids == [str(machine.uid)] * 4
    assert ids.in_range(machine.uid) and machine.uid != 0
    assert status["Groups"] == ""
    assert status["Seccomp"] == "2"
    assert status["NoNewPrivs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[cap] == "0000000000000000", cap
    # PID 1 of its own PID namespace, and its mount and network namespaces are its own.
    assert status["NSpid"].split() == [str(pid), "1"]
    for ns in ("mnt", "pid", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    devices = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    assert Path(f"/proc/{pid}/environ").read_bytes() == QEMU_ENV_WARDEN_SETS
    # Its cgroups hold it (joined before it ran).
    assert machine.cgroup is not None or cgroups.available() is not None
    if machine.cgroup is not None:
        for controller in cgroups.CONTROLLERS:
            procs = (machine.cgroup.path(controller) / "cgroup.procs").read_text().split()
            assert str(pid) in procs, controller


def test_qemu_has_its_rlimits_and_only_its_fds(two_vms: tuple[Machine, Machine]) -> None:
    machine = two_vms[0]
    pid = machine.pid
    assert pid is not None
    limits = {
        line[:26].strip(): line[26:].split()[:2]
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    }
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max open files"] == [str(spawn.NOFILE)] * 2
    assert limits["Max processes"] == [str(spawn.NPROC)] * 2
    fsize = int(limits["Max file size"][0])
    assert 0 < fsize <= spawn.fsize_limit(machine.spec.memory_mib, 16 << 20, writes_ram=True)
    # Nothing of the manager leaked into it: every fd is QEMU's own or one it was given.
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    home = str(Paths.from_env().home)
    leaked = [
        t
        for t in targets
        if t.startswith(home) and not t.startswith(str(machine.run.dir)) and "cache" not in t
    ]
    assert leaked == [], leaked


def test_the_jail_root_holds_only_the_vm_files(two_vms: tuple[Machine, Machine]) -> None:
    a, b = two_vms
    assert a.pid is not None and a.image is not None
    root = Path(f"/proc/{a.pid}/root")
    assert sorted(os.listdir(root / "dev")) == ["null", "urandom", "zero"]
    assert not (root / "etc" / "passwd").exists() and not (root / "root").exists()
    assert not (root / "proc" / "self").exists() and not (root / "sys" / "kernel").exists()
    home = Paths.from_env().home
    # The VM's own image files, the VM uid's inside; root's (0600) on the host.
    kernel = a.image.kernel.path
    assert (root / str(kernel).lstrip("/")).stat().st_uid == a.uid
    assert kernel.stat().st_uid == 0 and kernel.stat().st_mode & 0o077 == 0
    # Nothing of the other VM, the store, or the daemon's files.
    assert not (root / str(b.run.dir).lstrip("/")).exists()
    assert not (root / str(home / "state.db").lstrip("/")).exists()
    visible = {p.name for p in (root / str(a.run.dir).lstrip("/")).iterdir()}
    # The transfer window, and the VM's own channel secret that QEMU read at start (read-only;
    # the host's copy in the runtime dir is gone once the guest has it).
    assert visible == {"xfer.img", "channel.key"}
    assert not a.run.channel_key.exists()
    key = root / str(a.run.channel_key).lstrip("/")
    assert key.stat().st_uid == a.uid and key.stat().st_mode & 0o077 == 0
    with pytest.raises(OSError, match="Read-only file system"):
        os.open(key, os.O_WRONLY)


def _as_uid(uid: int, action: str, path: Path) -> int:
    """In a forked child running as ``uid`` (real, effective, saved; no groups), try
    ``action`` on ``path``; return 0 if it worked, else the errno."""
    child = os.fork()
    if child == 0:  # pragma: no cover (the forked child)
        code = 0
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if action == "list":
                os.listdir(path)
            elif action == "read":
                with open(path, "rb") as f:
                    f.read(1)
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_one_vm_uid_cannot_reach_another_vm_runtime_dir(
    two_vms: tuple[Machine, Machine],
) -> None:
    a, b = two_vms
    assert a.uid is not None and b.uid is not None and a.uid != b.uid
    attempts = [
        ("list", b.run.dir),
        ("read", b.run.xfer),
        ("read", b.run.dir / "owner.json"),
        ("connect", b.run.agent),
        ("connect", b.run.qmp),
    ]
    for action, path in attempts:
        assert path.exists(), path  # so that a refusal means something
        assert _as_uid(a.uid, action, path) == errno.EACCES, (action, path)
    # Not even its own: QEMU holds its sockets as fds; the dir is root's alone.
    assert _as_uid(a.uid, "list", a.run.dir) == errno.EACCES
    assert _as_uid(0, "list", b.run.dir) == 0  # the check itself works


def test_a_daemon_vm_is_jailed_apart_from_the_daemon(tmp_path: Path, no_leaks: None) -> None:
    d: ServeProcess
    with serving(tmp_path) as d, d.client() as http:
        r = http.post("/v1/sandboxes", json={"memory_mib": 128})
        assert r.status_code == 201, r.text
        vm = r.json()
        pid, daemon = vm["pid"], d.proc.pid if d.proc else None
        assert pid and daemon
        status = _status(pid)
        assert ids.in_range(int(status["Uid"].split()[0]))
        assert status["CapEff"] == "0000000000000000" and status["Seccomp"] == "2"
        for ns in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{daemon}/ns/{ns}")
        assert Path(f"/proc/{pid}/environ").read_bytes() == QEMU_ENV_WARDEN_SETS
        assert http.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"}).is_success


# -- bad input: --require-jail on a host that lacks a feature (faked) ----------------------


@pytest.fixture
def host_without_pid_ns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake: the feature check says this host cannot make PID namespaces."""
    real = features.detect

    def detect(*args: object, **kwargs: object) -> features.HostFeatures:
        host = real(*args, **kwargs)  # type: ignore[arg-type]
        return features.HostFeatures({**host.missing, features.PID: "faked for a test"})

    monkeypatch.setattr(features, "detect", detect)
    yield


def _nothing_left(paths: Paths, before: tuple[set[int], set[str], dict[int, str]]) -> None:
    pids, dirs, claims = before
    assert qemu_pids() == pids, "a QEMU was started"
    assert runtime_dirs() == dirs, "a runtime dir was made"
    assert ids.claimed(paths.vms) == claims, "a uid was claimed"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(paths.run / "jail") not in mounts, "a jail mount is visible"


def _snapshot(paths: Paths) -> tuple[set[int], set[str], dict[int, str]]:
    return qemu_pids(), runtime_dirs(), ids.claimed(paths.vms)


def test_require_jail_refuses_a_partial_jail_and_leaves_nothing(
    host_without_pid_ns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths.from_env()
    before = _snapshot(paths)
    monkeypatch.setattr(policy, "_default", "require")
    with pytest.raises(JailUnavailableError) as info:
        warden.Sandbox.create(memory_mib=128)
    message = str(info.value)
    assert "pid ns: faked for a test" in message and "warden doctor" in message
    _nothing_left(paths, before)
    # The same host without --require-jail: a logged downgrade, and the VM runs.
    monkeypatch.setattr(policy, "_default", "on")
    with warden.Sandbox.create(memory_mib=128) as sbx:
        machine = _machine(sbx)
        assert machine.jail is not None and not machine.jail.pid
        assert machine.jail.missing == {features.PID: "faked for a test"}
        assert machine.pid is not None
        assert os.readlink(f"/proc/{machine.pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    _nothing_left(paths, before)


def test_cli_require_jail_refuses_with_what_is_missing(
    host_without_pid_ns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths.from_env()
    before = _snapshot(paths)
    monkeypatch.setattr(policy, "_default", "on")  # the flag, not the test, sets require
    result = CliRunner().invoke(cli_main.app, ["run", "--require-jail", "--", "true"])
    assert result.exit_code == cli_main.EXIT_WARDEN_ERROR, result.output
    assert "pid ns" in result.output and "faked for a test" in result.output
    _nothing_left(paths, before)
    refused = CliRunner().invoke(
        cli_main.app, ["run", "--require-jail", "--host", "unix:///nowhere", "--", "true"]
    )
    assert refused.exit_code == 2 and "warden serve --require-jail" in refused.output


def test_serve_require_jail_refuses_to_start(
    host_without_pid_ns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy, "_default", "on")
    with pytest.raises(typer.Exit) as info:
        cli_serve._require_jail(Paths.from_env())
    assert info.value.exit_code == 1
