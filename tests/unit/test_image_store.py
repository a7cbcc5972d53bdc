"""The image store with synthetic artifacts: manifests, verification, listing, removal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from warden._errors import ImageError, ImageNotFoundError
from warden.config import Paths
from warden.image import store
from warden.image.store import Image
from warden.seal import digests


def fake_image(paths: Paths, name: str, tag: str, *, share_kernel: str | None = None) -> Image:
    """Write three small artifacts in cache dirs and a manifest that references them."""
    dirs = {
        "kernel": share_kernel or f"kernel-{tag}0",
        "initrd": f"initrd-{tag}1",
        "rootfs": f"rootfs-{tag}2",
    }
    arts = {}
    for kind, d in dirs.items():
        p = paths.cache / d / store.ARTIFACT_FILES[kind]
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_bytes(f"{kind} of {name}".encode() * 100)
        arts[kind] = store.make_artifact(p)
    image = Image(
        name=name,
        recipe_hash=f"{tag}" * 4,
        kernel_version="6.1.0-test",
        built_at="2025-01-01T00:00:00+00:00",
        kernel=arts["kernel"],
        initrd=arts["initrd"],
        rootfs=arts["rootfs"],
    )
    base = paths.cache / f"base-{tag}3"
    base.mkdir(parents=True, exist_ok=True)
    store.write_manifest(paths, image, [*dirs.values(), base.name])
    return image


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


def test_manifest_round_trip(paths: Paths) -> None:
    image = fake_image(paths, "default", "a")
    loaded = store.load_image(paths, "default")
    assert loaded == image
    data = json.loads((paths.images / "default.json").read_text())
    assert data["kernel"]["path"] == "cache/kernel-a0/vmlinuz"  # relative to $WARDEN_HOME
    assert set(data) >= {"name", "recipe_hash", "kernel_version", "built_at", "kernel"}
    store.verify_image(loaded)


def test_unknown_image_says_how_to_build(paths: Paths) -> None:
    with pytest.raises(ImageNotFoundError) as err:
        store.load_image(paths, "nope")
    assert "warden image build nope" in str(err.value)


def test_corrupt_manifest(paths: Paths) -> None:
    paths.images.mkdir(parents=True)
    (paths.images / "bad.json").write_text("{not json")
    with pytest.raises(ImageError) as err:
        store.load_image(paths, "bad")
    assert "--force" in str(err.value)
    (paths.images / "bad.json").write_text("{}")
    with pytest.raises(ImageError):
        store.load_image(paths, "bad")
    assert store.list_images(paths) == []


def test_verify_detects_corruption_and_missing_files(paths: Paths) -> None:
    image = fake_image(paths, "default", "a")
    store.verify_image(image)
    data = bytearray(image.rootfs.path.read_bytes())
    data[10] ^= 0xFF
    image.rootfs.path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        store.verify_image(image)
    msg = str(err.value)
    assert str(image.rootfs.path) in msg and "warden image build default --force" in msg
    image.rootfs.path.write_bytes(b"short")
    with pytest.raises(ImageError, match="size"):
        store.verify_image(image)
    image.initrd.path.unlink()
    with pytest.raises(ImageError, match="missing"):
        store.verify_image(image)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the files hashed; start with an empty in-process memo (as a new process does)."""
    calls: list[int] = []
    real = digests.sha256_fd

    def counting(fd: int) -> str:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(digests, "sha256_fd", counting)
    monkeypatch.setattr(digests, "_memo", {})
    return calls


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget what this process remembered: only the record under $WARDEN_HOME is left."""
    monkeypatch.setattr(digests, "_memo", {})


def test_a_verified_image_is_not_hashed_again_by_a_new_process(
    paths: Paths, hashes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 0)
    fake_image(paths, "default", "a")
    image = store.load_image(paths, "default")
    _new_process(monkeypatch)
    hashes.clear()
    store.verify_image(image)
    assert len(hashes) == 3
    record = paths.cache / "verified.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert not [p for p in paths.cache.iterdir() if p.name.endswith(".tmp")]
    _new_process(monkeypatch)
    store.verify_image(store.load_image(paths, "default"))
    store.verify_image(image)
    assert len(hashes) == 3, "an unchanged image is hashed once, not once per process"
    image.kernel.path.write_bytes(image.kernel.path.read_bytes())  # same bytes, new ctime
    _new_process(monkeypatch)
    store.verify_image(image)
    assert len(hashes) == 4


def test_a_change_that_keeps_size_and_mtime_is_still_caught(
    paths: Paths, hashes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, mtime set back: only the ctime moved, and that is enough to hash again."""
    monkeypatch.setattr(digests, "RACY_NS", 0)
    fake_image(paths, "default", "a")
    image = store.load_image(paths, "default")
    _new_process(monkeypatch)
    hashes.clear()
    store.verify_image(image)
    assert len(hashes) == 3  # and remembered in the record
    rootfs = image.rootfs.path
    before = rootfs.stat()
    data = bytearray(rootfs.read_bytes())
    data[5] ^= 0x01
    rootfs.write_bytes(bytes(data))
    os.utime(rootfs, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = rootfs.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    _new_process(monkeypatch)
    with pytest.raises(ImageError, match="sha256"):
        store.verify_image(image)


def test_every_part_of_the_stat_key_counts(paths: Paths, hashes: list[int]) -> None:
    record = digests.DigestRecord(paths.cache)
    path = paths.home / "rootfs.sqfs"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    stats = (1, 2, 3, 4, 5)
    record.remember((str(path), *stats), "ab" * 32)
    assert record.lookup((str(path), *stats)) == "ab" * 32
    digests._memo.clear()
    assert record.lookup((str(path), *stats)) == "ab" * 32, "from the record, not the process"
    for i, name in enumerate(("dev", "inode", "size", "mtime_ns", "ctime_ns")):
        changed = list(stats)
        changed[i] += 1
        key = (str(path), changed[0], changed[1], changed[2], changed[3], changed[4])
        assert record.lookup(key) is None, f"{name} was ignored"


def test_a_file_changed_just_before_hashing_is_not_remembered(
    paths: Paths, hashes: list[int]
) -> None:
    """Timestamps are coarse: a file hashed within RACY_NS of its last change may change
    again in the same tick without its stat changing, so its digest is not trusted later."""
    fake_image(paths, "default", "a")
    image = store.load_image(paths, "default")  # its files were written just now
    hashes.clear()
    store.verify_image(image)
    store.verify_image(image)
    assert len(hashes) == 6
    assert not (paths.cache / "verified.json").exists()


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"[]", b'{"format": 1, "files": []}', b'{"format": 1, "files": {"a": 1}}'],
)
def test_a_corrupt_record_is_treated_as_empty(
    paths: Paths, hashes: list[int], monkeypatch: pytest.MonkeyPatch, garbage: bytes
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 0)
    fake_image(paths, "default", "a")
    image = store.load_image(paths, "default")
    paths.cache.mkdir(parents=True, exist_ok=True)
    (paths.cache / "verified.json").write_bytes(garbage)
    _new_process(monkeypatch)
    hashes.clear()
    store.verify_image(image)
    assert len(hashes) == 3
    data = json.loads((paths.cache / "verified.json").read_text())  # rewritten, valid
    assert set(data["files"]) == {str(getattr(image, k).path) for k in store.KINDS}
    _new_process(monkeypatch)
    store.verify_image(image)
    assert len(hashes) == 3


def test_a_record_forgets_files_that_are_gone(paths: Paths, hashes: list[int]) -> None:
    record = digests.DigestRecord(paths.cache)
    gone = str(paths.home / "gone")
    record.remember((gone, 1, 1, 1, 1, 1), "00" * 32)
    kept = paths.home / "kept"
    kept.write_bytes(b"x")
    record.remember((str(kept), 1, 1, 1, 1, 1), "11" * 32)
    files = json.loads((paths.cache / "verified.json").read_text())["files"]
    assert list(files) == [str(kept)]


def test_list_images(paths: Paths) -> None:
    assert store.list_images(paths) == []
    fake_image(paths, "b", "b")
    fake_image(paths, "a", "a")
    assert [i.name for i in store.list_images(paths)] == ["a", "b"]


def test_remove_image_collects_unreferenced_cache_dirs(paths: Paths) -> None:
    fake_image(paths, "one", "a")
    fake_image(paths, "two", "b", share_kernel="kernel-a0")
    (paths.cache / "accel-probe.json").write_text("{}")  # not ours: left alone
    (paths.cache / ".tmp-dead-build").mkdir()  # a killed build's temp dir: removed
    store.remove_image(paths, "one")
    left = sorted(p.name for p in paths.cache.iterdir() if p.name != "verified.json")
    assert left == [
        ".lock",
        "accel-probe.json",
        "base-b3",
        "initrd-b1",
        "kernel-a0",  # still used by "two"
        "rootfs-b2",
    ]
    with pytest.raises(ImageNotFoundError):
        store.load_image(paths, "one")
    store.verify_image(store.load_image(paths, "two"))
    store.remove_image(paths, "two")
    left = sorted(p.name for p in paths.cache.iterdir() if p.name != "verified.json")
    assert left == [".lock", "accel-probe.json"]
    with pytest.raises(ImageNotFoundError):
        store.remove_image(paths, "two")


def test_bad_names_are_rejected(paths: Paths) -> None:
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ImageNotFoundError):
            store.load_image(paths, bad)


def test_cache_lock_serializes_and_reports_the_wait(paths: Paths) -> None:
    import threading
    import time

    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.cache_lock(paths):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    calls: list[bool] = []

    def waiting(blocked: bool) -> None:
        calls.append(blocked)
        if blocked:
            threading.Timer(0.2, release.set).start()

    start = time.monotonic()
    with store.cache_lock(paths, waiting):
        assert time.monotonic() - start >= 0.15
    t.join()
    assert calls == [True, False]
    with store.cache_lock(paths, waiting):  # free now: no wait reported
        pass
    assert calls == [True, False]
