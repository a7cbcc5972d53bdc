"""The image store with synthetic artifacts: manifests, verification, listing, removal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warden._errors import ImageError, ImageNotFoundError
from warden.config import Paths
from warden.image import store
from warden.image.store import Image


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


def test_verify_is_memoized(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    image = fake_image(paths, "default", "a")
    calls: list[Path] = []
    real = store.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(store, "sha256_file", counting)
    store._verified.clear()
    store.verify_image(image)
    assert len(calls) == 3
    store.verify_image(image)
    store.verify_image(image)
    assert len(calls) == 3, "an unchanged image is not hashed again"
    image.kernel.path.write_bytes(image.kernel.path.read_bytes())  # same bytes, new ctime
    store.verify_image(image)
    assert len(calls) == 4


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
    left = sorted(p.name for p in paths.cache.iterdir())
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
    assert sorted(p.name for p in paths.cache.iterdir()) == [".lock", "accel-probe.json"]
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
