"""The jail's parts, without QEMU: the launcher's root-building and status protocol run for
real (as root, in new namespaces) around a small program (`sleep`) instead of QEMU; the VM
tests are in tests/security/test_jail.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from warden._errors import LaunchError
from warden.jail import features, files, ids, launcher, spawn
from warden.jail.features import JailPlan
from warden.jail.policy import JailUnavailableError, set_default_mode
from warden.vmm.argv import SANDBOX, BootFiles, PassedFd, RuntimeFiles, build_argv
from warden.vmm.spec import VMSpec

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")
SLEEP = shutil.which("sleep") or "/usr/bin/sleep"


def _plan(**missing: str) -> JailPlan:
    host = features.HostFeatures({k.replace("_", " "): v for k, v in missing.items()})
    return JailPlan.from_features(host)


def test_mirror_makes_the_symlinks_and_dirs_of_a_path(tmp_path: Path) -> None:
    loader = "/lib64/ld-linux-x86-64.so.2"
    if not os.path.exists(loader):
        pytest.skip("no x86-64 loader here")
    real = launcher.mirror(str(tmp_path), loader)
    assert real == os.path.realpath(loader)
    # Every symlink on the way is made as it is on the host, and the real file's dir exists.
    here = tmp_path / loader.lstrip("/")
    assert os.path.lexists(here)
    assert (tmp_path / os.path.dirname(real).lstrip("/")).is_dir()
    if os.path.islink("/lib64"):
        assert os.readlink(tmp_path / "lib64") == os.readlink("/lib64")


def test_a_partial_jail_is_refused_when_required_and_says_what_is_missing() -> None:
    plan = _plan(pid_ns="unshare --pid failed", cgroups="not mounted")
    if os.geteuid() == 0:
        assert plan.enabled and plan.mount and not plan.pid and not plan.cgroups
    with pytest.raises(JailUnavailableError) as info:
        plan.refuse_if_incomplete()
    text = str(info.value)
    assert "pid ns: unshare --pid failed" in text and "cgroups: not mounted" in text
    assert "warden doctor" in text
    _plan().refuse_if_incomplete()  # nothing missing: nothing refused


def test_the_uid_needs_idmapped_mounts_and_the_mount_namespace() -> None:
    if os.geteuid() != 0:
        pytest.skip("the plan is empty without root")
    assert _plan().uid
    assert not _plan(idmapped_mounts="kernel too old").uid
    assert not _plan(mount_ns="blocked").uid


def test_the_doctor_lists_every_feature() -> None:
    rows = features.HostFeatures({features.NET: "no"}).rows()
    assert [r[0] for r in rows] == list(features.FEATURES)
    assert (features.NET, False, "no") in rows
    assert all(ok for name, ok, _ in rows if name != features.NET)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="off, on, require"):
        set_default_mode("sometimes")  # type: ignore[arg-type]


def test_jailed_argv_passes_sockets_and_sandboxes() -> None:
    boot = BootFiles(Path("/img/k"), Path("/img/i"), Path("/img/r"))
    run = RuntimeFiles(Path("/home/run/vms/abc"))
    argv = build_argv(
        VMSpec(), boot, run, accel="tcg", console_socket=True, passed_fds=True, sandbox=True
    )
    text = " ".join(argv)
    assert f"socket,id=qmp,fd={PassedFd.QMP},server=on,wait=off" in argv
    assert f"socket,id=agent,fd={PassedFd.AGENT},server=on,wait=off" in argv
    assert f"socket,id=console,fd={PassedFd.CONSOLE},server=on,wait=on" in argv
    assert "-pidfile" not in argv and "agent.sock" not in text and "qmp.sock" not in text
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert str(run.xfer) in text  # the command line still names the runtime dir
    with pytest.raises(ValueError, match="console"):
        build_argv(VMSpec(), boot, run, accel="tcg", passed_fds=True)


def test_fsize_bounds_what_the_vm_writes() -> None:
    xfer = 16 << 20
    assert spawn.fsize_limit(256, xfer, writes_ram=False) == xfer + spawn.FSIZE_MARGIN
    assert spawn.fsize_limit(256, xfer, writes_ram=True) == (256 << 20) + spawn.FSIZE_MARGIN


def test_namespaces_follow_the_plan() -> None:
    if os.geteuid() != 0:
        pytest.skip("the plan is empty without root")
    full = spawn.namespace_prefix(_plan(), "unshare")
    assert full == ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--net", "--"]
    assert "--pid" not in spawn.namespace_prefix(_plan(pid_ns="no"), "unshare")


def test_qemu_files_hold_its_loader_libc_module_and_firmware() -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("no QEMU here")
    found = files.qemu_files(qemu, "tcg")
    assert os.path.realpath(qemu) in found
    assert any("libc.so" in f for f in found) and any("ld-linux" in f for f in found)
    assert any(f.endswith("accel-tcg-x86_64.so") for f in found)
    assert any(f.endswith("bios-microvm.bin") for f in found)
    assert not any(f.endswith("accel-tcg-x86_64.so") for f in files.qemu_files(qemu, "kvm"))


# -- the launcher for real, around `sleep` -------------------------------------------------


def _config(tmp_path: Path, uid: int | None, image: Path, **extra: object) -> spawn.JailConfig:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    ro = sorted({os.path.realpath(SLEEP), *files._libraries(SLEEP)})
    cfg = spawn.JailConfig(
        root=mnt,
        ro_files=ro,
        id_files=[str(image)],
        rw_files=[],
        devices=["null", "zero", "urandom"],
        uid=uid,
        cgroups=[],
        rlimits=spawn.rlimits(1 << 20),
        mount=True,
        nnp=True,
        pdeathsig=True,
    )
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
async def image(tmp_path: Path) -> AsyncIterator[Path]:
    """A root-only file, like the image files."""
    path = tmp_path / "image" / "kernel"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"kernel")
    path.chmod(0o600)
    yield path


async def _start(tmp_path: Path, cfg: spawn.JailConfig, argv: list[str]) -> spawn.JailedProcess:
    plan = _plan()
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return await spawn.start(
            argv,
            cfg,
            {},
            prefix=spawn.namespace_prefix(plan, shutil.which("unshare") or "unshare"),
            log_fd=log,
            new_session=True,
        )
    finally:
        os.close(log)


@ROOT_ONLY
async def test_the_launcher_jails_and_reports_the_host_pid(tmp_path: Path, image: Path) -> None:
    vms = tmp_path / "run" / "vms"
    vms.mkdir(parents=True)
    uid = ids.claim(vms, "t")
    proc = await _start(tmp_path, _config(tmp_path, uid, image), [SLEEP, "30"])
    seen: list[tuple[int, int]] = []
    try:
        await proc.ready([SLEEP], on_pid=lambda pid, start: seen.append((pid, start)))
        assert proc.qemu_pid is not None and seen == [(proc.qemu_pid, proc.start_time)]
        pid = proc.qemu_pid
        assert pid != proc._proc.pid  # PID 1 of its namespace is unshare's child
        await asyncio.sleep(0.2)  # the exec
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
        assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
        assert "NoNewPrivs:\t1" in status
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""
        assert os.readlink(f"/proc/{pid}/exe").endswith("sleep")
        root = f"/proc/{pid}/root"
        # Inside: the image file is the VM uid's (idmapped); on the host it stays root's.
        assert os.stat(f"{root}{image}").st_uid == uid
        assert os.stat(image).st_uid == 0 and stat.S_IMODE(os.stat(image).st_mode) == 0o600
        assert sorted(os.listdir(f"{root}/dev")) == ["null", "urandom", "zero"]
        assert not os.path.exists(f"{root}/etc/passwd")
        assert not os.path.exists(f"{root}{tmp_path}/log")
        for ns in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    finally:
        proc.send_signal(9)
        code = await proc.wait()
        ids.release(vms, uid)
    assert code != 0


@ROOT_ONLY
async def test_a_failed_step_is_reported_and_nothing_runs(tmp_path: Path, image: Path) -> None:
    cfg = _config(tmp_path, None, image, ro_files=["/nonexistent/file"])
    proc = await _start(tmp_path, cfg, [SLEEP, "30"])
    with pytest.raises(LaunchError, match=r"the jail failed at root: .*nonexistent"):
        await proc.ready([SLEEP])
    assert await proc.wait() == 1
    assert "warden jail: root:" in (tmp_path / "log").read_text()


@ROOT_ONLY
async def test_only_the_passed_fds_reach_the_program(tmp_path: Path, image: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        fds = {b.fileno(): PassedFd.QMP}
        plan = _plan()
        log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
        stray = os.open(tmp_path / "log", os.O_RDONLY)  # inheritable, but not passed
        os.set_inheritable(stray, True)
        try:
            proc = await spawn.start(
                [SLEEP, "30"],
                _config(tmp_path, None, image),
                fds,
                prefix=spawn.namespace_prefix(plan, shutil.which("unshare") or "unshare"),
                log_fd=log,
                new_session=True,
            )
        finally:
            os.close(log)
            os.close(stray)
        try:
            await proc.ready([SLEEP])
            await asyncio.sleep(0.2)
            assert proc.qemu_pid is not None
            open_fds = sorted(int(f) for f in os.listdir(f"/proc/{proc.qemu_pid}/fd"))
            assert open_fds == [0, 1, 2, PassedFd.QMP]
        finally:
            proc.send_signal(9)
            await proc.wait()


def test_doctor_shows_a_missing_feature_as_a_downgrade(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    import typer

    from warden.cli import doctor
    from warden.config import Paths

    def detect(*args: object, **kwargs: object) -> features.HostFeatures:
        return features.HostFeatures({features.NET: "faked: no network namespaces"})

    monkeypatch.setattr(features, "detect", detect)
    image = cast(Any, SimpleNamespace(kernel=SimpleNamespace(path=tmp_path / "k")))
    rows = doctor._jail_checks(Paths(tmp_path), "/usr/bin/qemu", image)
    assert [r.name for r in rows] == [f"jail: {f}" for f in features.FEATURES]
    net = next(r for r in rows if r.name == "jail: net ns")
    assert (net.ok, net.downgrade, net.detail) == (False, True, "faked: no network namespaces")
    assert "unshare" in net.fix
    ok = doctor.Check("qemu", True, "fine")
    monkeypatch.setattr(doctor, "_checks", lambda: [ok, net])
    doctor.doctor()  # a downgrade alone: warden still runs, the doctor does not fail
    monkeypatch.setattr(doctor, "_checks", lambda: [ok, net, doctor.Check("image", False, "no")])
    with pytest.raises(typer.Exit):
        doctor.doctor()
