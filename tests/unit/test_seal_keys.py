"""The host key store and the seal: 0600 keys made once and atomically, unsafe keys refused,
seals that bind every field and the key."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from warden.config import Paths
from warden.seal import KEY_BYTES, KeyStore, KeyStoreError, Sealer, SealRefused


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


def test_a_key_is_made_once_0600_in_a_0700_dir(paths: Paths) -> None:
    keys = KeyStore(paths)
    assert keys.get("seal") is None
    old = os.umask(0)  # a loose umask must not loosen the key
    try:
        key = keys.ensure("seal")
    finally:
        os.umask(old)
    path = paths.home / "keys" / "seal.key"
    assert len(key) == KEY_BYTES and path.read_bytes() == key
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    inode = path.stat().st_ino
    assert keys.ensure("seal") == key, "an existing key is never made again"
    assert KeyStore(paths).get("seal") == key
    assert path.stat().st_ino == inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["seal.key"]  # no temp file left


def _ensure_in_child(home: str, out: multiprocessing.Queue[bytes]) -> None:
    out.put(KeyStore(Paths(Path(home))).ensure("seal"))


def test_racing_processes_agree_on_one_key(paths: Paths) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(paths.home), out)) for _ in range(8)]
    for p in procs:
        p.start()
    got = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == {KeyStore(paths).get("seal")}, "every process must end up with the same key"
    assert [p.name for p in (paths.home / "keys").iterdir()] == ["seal.key"]


def test_a_half_made_key_is_never_seen(paths: Paths) -> None:
    keys = KeyStore(paths)
    (paths.home / "keys").mkdir(parents=True)
    # A writer that died before its link: its temp file is not the key.
    (paths.home / "keys" / ".seal.key.1.dead.tmp").write_bytes(b"\0" * 5)
    assert keys.get("seal") is None
    assert len(keys.ensure("seal")) == KEY_BYTES


@pytest.mark.parametrize("problem", ["mode", "size", "symlink"])
def test_an_unsafe_key_is_refused(paths: Paths, tmp_path: Path, problem: str) -> None:
    keys = KeyStore(paths)
    keys.ensure("seal")
    path = keys.path("seal")
    if problem == "mode":
        os.chmod(path, 0o644)
    elif problem == "size":
        path.write_bytes(b"short")
    else:
        path.unlink()
        (tmp_path / "planted").write_bytes(b"k" * KEY_BYTES)
        path.symlink_to(tmp_path / "planted")
    with pytest.raises(KeyStoreError, match="delete it"):
        keys.get("seal")
    with pytest.raises(KeyStoreError):
        keys.ensure("seal")  # nor is it silently replaced


def test_per_vm_secrets_live_in_a_namespace(paths: Paths) -> None:
    keys = KeyStore(paths)
    secret = os.urandom(KEY_BYTES)
    keys.put("vm/abc123", secret)
    assert keys.get("vm/abc123") == secret
    assert _mode(keys.path("vm/abc123")) == 0o600 and _mode(paths.home / "keys" / "vm") == 0o700
    other = os.urandom(KEY_BYTES)
    keys.put("vm/abc123", other)  # re-keying replaces it atomically
    assert keys.get("vm/abc123") == other
    keys.delete("vm/abc123")
    assert keys.get("vm/abc123") is None and not (paths.home / "keys" / "vm").exists()
    for bad in ("../seal", "a/b/c", ".seal", "Seal", "", "vm/"):
        with pytest.raises(ValueError):
            keys.path(bad)
    with pytest.raises(ValueError):
        keys.put("vm/x", b"short")


def test_the_seal_binds_every_field_the_purpose_and_the_key(paths: Paths) -> None:
    sealer = Sealer(paths, "boot-snapshot/1")
    record = sealer.seal({"memory_mib": 256, "state_sha256": "ab" * 32, "created": 1.5})
    assert sealer.verify(record) == {"memory_mib": 256, "state_sha256": "ab" * 32, "created": 1.5}
    for changed in ({"memory_mib": 257}, {"created": 1.25}, {"extra": 1}):
        with pytest.raises(SealRefused, match="does not verify"):
            sealer.verify({**record, **changed})
    with pytest.raises(SealRefused, match="does not verify"):
        Sealer(paths, "template/1").verify(record)  # not valid for another purpose
    with pytest.raises(SealRefused, match="not sealed"):
        sealer.verify({k: v for k, v in record.items() if k != "seal"})
    KeyStore(paths).put("seal", os.urandom(KEY_BYTES))  # another host key
    with pytest.raises(SealRefused, match="another host key"):
        sealer.verify(record)
