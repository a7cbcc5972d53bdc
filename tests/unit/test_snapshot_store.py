"""The boot snapshot store: keys that match only the same machine, pruning, and seals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from warden.config import Paths
from warden.seal import KeyStore, digests
from warden.vmm.argv import BootFiles, RuntimeFiles, build_argv
from warden.vmm.snapshot import META_FILE, STATE_FILE, BootSnapshots, SnapshotConfig
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


# -- sealing (synthetic state files; tests/security/test_sealed_snapshots.py uses real VMs) --

CONFIG = SnapshotConfig(
    key="k" * 24,
    qemu_version="QEMU emulator version 7.2.22",
    kernel_sha256="a" * 64,
    initrd_sha256="b" * 64,
    rootfs_sha256="c" * 64,
    memory_mib=256,
    vcpus=1,
)
STATE = b"QEVM" + bytes(range(256)) * 64


@pytest.fixture
def store(tmp_path: Path) -> BootSnapshots:
    return BootSnapshots(Paths(tmp_path / "home"))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the state files hashed, with an empty in-process memo, as in a new process."""
    calls: list[int] = []
    real = digests.sha256_fd

    def counting(fd: int) -> str:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(digests, "sha256_fd", counting)
    monkeypatch.setattr(digests, "_memo", {})
    return calls


def _save(store: BootSnapshots, state: bytes = STATE, config: SnapshotConfig = CONFIG) -> Path:
    """What ``capture`` leaves, without a QEMU: state.bin and its sealed meta.json."""
    target = store.root / config.key
    target.mkdir(parents=True, exist_ok=True)
    (target / STATE_FILE).write_bytes(state)
    digest = hashlib.sha256(state).hexdigest()
    (target / META_FILE).write_bytes(store.sealed_meta(config, {"image": "x"}, len(state), digest))
    return target


def _open(store: BootSnapshots, config: SnapshotConfig = CONFIG) -> bytes | None:
    f = store.open_sealed(config)
    if f is None:
        return None
    with f:
        assert f.tell() == 0
        return f.read()


def test_a_sealed_snapshot_opens_at_offset_zero(store: BootSnapshots) -> None:
    target = _save(store)
    meta = json.loads((target / META_FILE).read_text())
    assert meta["seal"]["alg"] == "HMAC-SHA256" and meta["memory_mib"] == 256
    assert stat.S_IMODE((store.root.parent / "keys" / "seal.key").stat().st_mode) == 0o600
    assert _open(store) == STATE


@pytest.mark.parametrize("where", [0, len(STATE) // 2, len(STATE) - 1])
def test_one_flipped_byte_is_refused_and_deleted(
    store: BootSnapshots, caplog: pytest.LogCaptureFixture, where: int
) -> None:
    target = _save(store)
    data = bytearray(STATE)
    data[where] ^= 0x01
    (target / STATE_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert _open(store) is None
    assert "changed after it was sealed" in caplog.text and "booting cold" in caplog.text
    assert not target.exists(), "a refused snapshot is deleted"


def test_a_cut_or_grown_file_is_refused(store: BootSnapshots) -> None:
    for state in (STATE[:-1], STATE + b"\0"):
        target = _save(store)
        (target / STATE_FILE).write_bytes(state)
        assert _open(store) is None and not target.exists()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"memory_mib": 512}, "another configuration (memory_mib 256, this VM 512)"),
        ({"vcpus": 2}, "another configuration (vcpus"),
        ({"rootfs_sha256": "d" * 64}, "another configuration (rootfs_sha256"),
        ({"qemu_version": "QEMU emulator version 8.2.0"}, "another configuration (qemu_version"),
        ({"key": "j" * 24}, "another configuration (key"),
    ],
)
def test_a_snapshot_sealed_for_another_configuration_is_refused(
    store: BootSnapshots, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str
) -> None:
    """A valid seal, moved to where another configuration looks for its snapshot."""
    target = _save(store)
    other = dataclasses.replace(CONFIG, **change)
    if other.key != CONFIG.key:
        target = target.rename(store.root / other.key)
    with caplog.at_level(logging.WARNING):
        assert _open(store, other) is None
    assert reason in caplog.text
    assert not target.exists()


def test_altered_metadata_or_another_key_is_refused(
    store: BootSnapshots, caplog: pytest.LogCaptureFixture
) -> None:
    target = _save(store)
    meta = json.loads((target / META_FILE).read_text())
    (target / META_FILE).write_text(json.dumps({**meta, "boot_files": ["/elsewhere"]}))
    with caplog.at_level(logging.WARNING):
        assert _open(store) is None
    assert "seal does not verify" in caplog.text
    target = _save(store)
    KeyStore(Paths(store.root.parent)).put("seal", os.urandom(32))  # as if from another host
    assert _open(store) is None and not target.exists()


@pytest.mark.parametrize("problem", ["unsealed", "no meta", "bad json", "symlink", "meta symlink"])
def test_unsealed_or_broken_snapshots_are_refused(
    store: BootSnapshots, tmp_path: Path, problem: str
) -> None:
    target = _save(store)
    if problem == "unsealed":  # saved by an older warden
        meta = json.loads((target / META_FILE).read_text())
        (target / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "seal"}))
    elif problem == "no meta":
        (target / META_FILE).unlink()
    elif problem == "bad json":
        (target / META_FILE).write_text("{")
    elif problem == "meta symlink":
        (target / META_FILE).rename(tmp_path / "meta.json")
        (target / META_FILE).symlink_to(tmp_path / "meta.json")
    else:
        elsewhere = tmp_path / "elsewhere.bin"
        (target / STATE_FILE).rename(elsewhere)
        (target / STATE_FILE).symlink_to(elsewhere)
    assert _open(store) is None
    assert not target.exists()


def test_a_verified_state_is_not_hashed_again(
    store: BootSnapshots, hashes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 0)
    _save(store)
    assert _open(store) == STATE and len(hashes) == 1
    monkeypatch.setattr(digests, "_memo", {})  # a new process: only the record is left
    assert _open(store) == STATE and len(hashes) == 1
    record = json.loads((store.root.parent / "cache" / "verified.json").read_text())
    assert str(store.root / CONFIG.key / STATE_FILE) in record["files"]
    # Rewritten with the same size and mtime: the ctime moved, so it is hashed again.
    path = store.root / CONFIG.key / STATE_FILE
    before = path.stat()
    data = bytearray(STATE)
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _open(store) is None and len(hashes) == 2


def test_the_file_verified_is_the_file_returned(
    store: BootSnapshots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No check by path then load by path: a file swapped in during the check is not used."""
    target = _save(store)
    real = digests.sha256_fd

    def swap_then_hash(fd: int) -> str:
        tampered = target / "swap.tmp"
        tampered.write_bytes(b"X" * len(STATE))
        tampered.replace(target / STATE_FILE)
        return real(fd)

    monkeypatch.setattr(digests, "sha256_fd", swap_then_hash)
    monkeypatch.setattr(digests, "_memo", {})
    assert _open(store) == STATE
