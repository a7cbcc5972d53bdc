"""The boot snapshot store: keys that match only the same machine, and pruning."""

from __future__ import annotations

import json
from pathlib import Path

from warden.config import Paths
from warden.vmm.argv import BootFiles, RuntimeFiles, build_argv
from warden.vmm.snapshot import META_FILE, STATE_FILE, BootSnapshots
from warden.vmm.spec import VMSpec

BOOT = BootFiles(Path("/img/vmlinux"), Path("/img/initrd.img"), Path("/img/rootfs.sqfs"))


def _key(spec: VMSpec, vm_id: str, qemu: str = "QEMU 7.2") -> str:
    run = RuntimeFiles(Path("/var/lib/warden/run/vms") / vm_id)
    return BootSnapshots.key(build_argv(spec, BOOT, run, accel="tcg"), vm_id, run.dir, qemu)


def test_the_key_ignores_per_vm_names_only() -> None:
    assert _key(VMSpec(), "aaaaaaaaaaaa") == _key(VMSpec(), "bbbbbbbbbbbb")
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(memory_mib=512), "a" * 12)
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(vcpus=2), "a" * 12)
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(), "a" * 12, qemu="QEMU 8.0")
    # env and labels are not machine state: they don't split snapshots.
    assert _key(VMSpec(), "a" * 12) == _key(VMSpec(env={"A": "1"}, labels={"x": "y"}), "a" * 12)


def test_prune_drops_snapshots_of_vanished_images(tmp_path: Path) -> None:
    store = BootSnapshots(Paths(tmp_path))
    kept_file = tmp_path / "rootfs.sqfs"
    kept_file.write_bytes(b"x")
    for name, files in (("live", [str(kept_file)]), ("stale", [str(tmp_path / "gone")])):
        d = store.root / name
        d.mkdir(parents=True)
        (d / STATE_FILE).write_bytes(b"state")
        (d / META_FILE).write_text(json.dumps({"boot_files": files}))
    (store.root / "writing").mkdir()  # no meta yet: left alone
    removed = store.prune()
    assert [p.name for p in removed] == ["stale"]
    assert store.lookup("live") is not None
    assert (store.root / "writing").is_dir()
    store.discard("live")
    assert store.lookup("live") is None
