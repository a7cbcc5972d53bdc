"""The ownership rule: stale runtime dirs are swept, live ones are kept, nothing by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from warden.vmm import ownership
from warden.vmm.ownership import Ownership


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_dirs_of_dead_owners_only(tmp_path: Path) -> None:
    live = tmp_path / "live"
    dead = tmp_path / "dead"
    daemon = tmp_path / "daemon"
    for d in (live, dead, daemon):
        d.mkdir()
    (live / "owner.json").write_text(
        json.dumps(
            {"owner_pid": os.getpid(), "owner_start": ownership.proc_start_time(os.getpid())}
        )
    )
    (dead / "owner.json").write_text(json.dumps({"owner_pid": _dead_pid(), "owner_start": 1}))
    (daemon / "owner.json").write_text(json.dumps({"ownership": "daemon", "owner_pid": 1}))
    swept = ownership.sweep_stale(tmp_path)
    assert swept == [dead]
    assert live.exists() and daemon.exists() and not dead.exists()


def test_a_janitor_leaves_its_owners_daemon_vms(tmp_path: Path) -> None:
    """A daemon that ran an embedded VM (the footprint calibration at start-up) has a janitor;
    when the daemon is killed, that janitor sweeps its embedded VMs, not its daemon VMs."""
    owner = _dead_pid()
    embedded, daemon = tmp_path / "embedded", tmp_path / "daemon"
    for d, kind in ((embedded, "embedded"), (daemon, "daemon")):
        d.mkdir()
        (d / "owner.json").write_text(json.dumps({"ownership": kind, "owner_pid": owner}))
    assert ownership.sweep_stale(tmp_path, owner_pid=owner) == [embedded]
    assert daemon.exists()


def test_a_recycled_pid_is_not_the_owner(tmp_path: Path) -> None:
    d = tmp_path / "vm"
    d.mkdir()
    # Our pid, but a different start time: the real owner died and the pid was reused.
    start = ownership.proc_start_time(os.getpid())
    assert start is not None
    (d / "owner.json").write_text(json.dumps({"owner_pid": os.getpid(), "owner_start": start + 1}))
    assert ownership.sweep_stale(tmp_path) == [d]


def test_release_kills_only_a_process_that_names_the_dir(tmp_path: Path) -> None:
    d = tmp_path / "vm"
    d.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(d)])
    try:
        ownership.record_qemu(d, stranger.pid)
        ownership.release(d)
        assert stranger.poll() is None, "a process not naming the dir must not be killed"
        d.mkdir()
        ownership.record_qemu(d, named.pid)
        ownership.release(d)
        assert named.wait(timeout=5) == -9
        assert not d.exists()
    finally:
        for p in (stranger, named):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_janitor_cleans_up_after_its_owner_is_killed(tmp_path: Path) -> None:
    """An owner claims a dir, then dies by SIGKILL: its janitor removes the dir."""
    vms = tmp_path / "vms"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from warden.vmm import ownership\n"
        f"d = Path({str(vms)!r}) / 'x'\n"
        "d.mkdir(parents=True)\n"
        "ownership.claim(d, ownership.Ownership.EMBEDDED)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "ready"
    assert (vms / "x" / "owner.json").exists()
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while (vms / "x").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (vms / "x").exists()


def test_prefix_ties_embedded_vms_to_their_owner() -> None:
    assert ownership.spawn_prefix(Ownership.EMBEDDED)[:3] == ["setpriv", "--pdeathsig", "KILL"]
    assert ownership.spawn_prefix(Ownership.DAEMON) == []
    assert ownership.new_session(Ownership.DAEMON)


def test_vm_cgroups_are_made_and_removed(tmp_path: Path) -> None:
    from warden.vmm import cgroups

    root = tmp_path / "cgroup"
    group = cgroups.VMCgroup("vm0000000001", root=root)
    for controller in cgroups.CONTROLLERS:
        (root / controller).mkdir(parents=True)
    # A fake cgroupfs: plain dirs take the limit files, and rmdir works once they are gone.
    group.create(cgroups.Limits.for_vm(128, 1, 64))
    assert (group.path("memory") / "memory.limit_in_bytes").read_text() == f"{192 << 20}\n"
    for controller in cgroups.CONTROLLERS:
        for f in group.path(controller).iterdir():
            f.unlink()
    group.remove()
    assert not any(group.path(c).exists() for c in cgroups.CONTROLLERS)


def test_release_kills_only_the_process_started_at_the_recorded_time(tmp_path: Path) -> None:
    """The pid names the dir, but its start time is not the recorded one: a recycled pid."""
    d = tmp_path / "vm"
    d.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(d)])
    try:
        start = ownership.proc_start_time(proc.pid)
        assert start is not None
        ownership.record_qemu(d, proc.pid, start + 1)
        ownership.release(d)
        assert proc.poll() is None, "a process started at another time must not be killed"
        assert ownership.kill_verified(proc.pid, start, d, grace_s=5.0)
        assert proc.wait(timeout=5) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
