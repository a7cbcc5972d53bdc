"""Each VM's uid: claimed atomically from warden's range, released with the VM, and an orphan
claim (its VM's runtime dir gone) swept unless a process still runs as that uid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from warden.jail import ids
from warden.vmm import ownership


def _vms(tmp_path: Path) -> Path:
    vms = tmp_path / "run" / "vms"
    vms.mkdir(parents=True)
    return vms


def test_claims_are_unique_in_range_and_private(tmp_path: Path) -> None:
    vms = _vms(tmp_path)
    got: list[int] = []
    lock = threading.Lock()

    def take(n: int) -> None:
        for i in range(n):
            uid = ids.claim(vms, f"vm{threading.get_ident()}-{i}")
            with lock:
                got.append(uid)

    threads = [threading.Thread(target=take, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 200
    assert all(ids.in_range(u) for u in got)
    base = ids.claims_dir(vms)
    assert base.stat().st_mode & 0o777 == 0o700
    assert {(base / str(u)).stat().st_mode & 0o777 for u in got} == {0o600}


def test_a_claimed_uid_is_never_handed_out_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = _vms(tmp_path)
    # Every claim starts its search at FIRST_UID.
    monkeypatch.setattr("warden.jail.ids.secrets.randbelow", lambda n: 0)
    first = ids.claim(vms, "a")
    second = ids.claim(vms, "b")
    assert (first, second) == (ids.FIRST_UID, ids.FIRST_UID + 1)
    ids.release(vms, first, "someone-else")  # not theirs: kept
    assert ids.holder(vms, first) == "a"
    ids.release(vms, first, "a")
    assert ids.holder(vms, first) is None
    assert ids.claim(vms, "c") == first


def test_no_free_uid_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vms = _vms(tmp_path)
    monkeypatch.setattr(ids, "COUNT", 2)
    ids.claim(vms, "a")
    ids.claim(vms, "b")
    with pytest.raises(ids.NoFreeUidError):
        ids.claim(vms, "c")


def test_release_of_a_runtime_dir_frees_its_uid(tmp_path: Path) -> None:
    vms = _vms(tmp_path)
    rundir = vms / "vm1"
    rundir.mkdir()
    ownership.claim(rundir, ownership.Ownership.DAEMON)
    uid = ids.claim(vms, "vm1")
    ownership.record_uid(rundir, uid)
    assert json.loads((rundir / "owner.json").read_text())["uid"] == uid
    ownership.release(rundir)
    assert not rundir.exists()
    assert ids.holder(vms, uid) is None


def test_orphan_claims_are_swept_once_old_and_unused(tmp_path: Path) -> None:
    vms = _vms(tmp_path)
    (vms / "live").mkdir()
    live = ids.claim(vms, "live")
    young = ids.claim(vms, "gone-young")
    old = ids.claim(vms, "gone-old")
    past = time.time() - 3600
    os.utime(ids.claims_dir(vms) / str(old), (past, past))
    assert ids.sweep_orphans(vms) == [old]
    assert set(ids.claimed(vms)) == {live, young}


def test_an_orphan_uid_still_running_a_process_is_kept(tmp_path: Path) -> None:
    """A QEMU that outlived its kill keeps its uid: a new VM must never share it."""
    vms = _vms(tmp_path)
    uid = ids.claim(vms, "gone")
    past = time.time() - 3600
    os.utime(ids.claims_dir(vms) / str(uid), (past, past))
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "30"]
    )
    try:
        deadline = time.monotonic() + 5
        while uid not in ids.uids_in_use() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ids.sweep_orphans(vms) == []
        assert ids.holder(vms, uid) == "gone"
    finally:
        proc.kill()
        proc.wait()
    assert ids.sweep_orphans(vms) == [uid]


def test_sweep_stale_frees_the_uid_of_a_dead_owner(tmp_path: Path) -> None:
    """kill -9 of an owner: the next start's sweep releases its dir and its uid."""
    vms = _vms(tmp_path)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from warden.jail import ids\n"
        "from warden.vmm import ownership\n"
        f"d = Path({str(vms)!r}) / 'x'\n"
        "d.mkdir()\n"
        "ownership.claim(d, ownership.Ownership.DAEMON)\n"
        "ownership._write_owner(d, {'ownership': 'embedded', 'owner_pid': 1, 'owner_start': 1})\n"
        "ownership.record_uid(d, ids.claim(d.parent, 'x'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert len(ids.claimed(vms)) == 1
    assert ownership.sweep_stale(vms) == [vms / "x"]
    assert ids.claimed(vms) == {}


def test_conflicting_users_are_found(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    group = tmp_path / "group"
    passwd.write_text("root:x:0:0::/root:/bin/sh\nintruder:x:400001:400001::/:/bin/sh\n")
    group.write_text("root:x:0:\n")
    assert ids.conflicts(passwd, group) == [f"user intruder (400001) in {passwd}"]
    assert ids.conflicts(group, group) == []
