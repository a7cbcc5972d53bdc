"""Recipe hashes: stable for the same inputs, and each input changes only the right artifacts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from warden._errors import HostError, ImageNotFoundError
from warden.image import recipe
from warden.image.initramfs import INIT_SCRIPT
from warden.image.recipe import Recipe

AGENT = {
    "usr/lib/warden/agent_main.py": b"from warden.agent.guest import main\nmain()\n",
    "usr/lib/warden/warden/agent/guest.py": b"def main(): pass\n",
}
BUSYBOX = "b" * 64


@dataclass(frozen=True)
class Hashes:
    kernel: str
    initrd: str
    base: str
    rootfs: str
    image: str


def hashes(
    r: Recipe,
    *,
    kernel_version: str = "6.1.192-2",
    agent: dict[str, bytes] | None = None,
    init: str = INIT_SCRIPT,
    busybox: str = BUSYBOX,
) -> Hashes:
    """Every hash of an image, computed the way build_image computes them."""
    k = recipe.kernel_hash(r, "linux-image-6.1.0-56-cloud-amd64", kernel_version)
    i = recipe.initrd_hash(k, init, r.modules, busybox)
    b = recipe.base_hash(r)
    rf = recipe.rootfs_hash(b, AGENT if agent is None else agent)
    return Hashes(k, i, b, rf, recipe.image_hash(r, k, i, rf))


BASE = Recipe(name="default", suite="bookworm")


def changed(a: Hashes, b: Hashes) -> set[str]:
    return {
        f for f in ("kernel", "initrd", "base", "rootfs", "image") if getattr(a, f) != getattr(b, f)
    }


def test_stable_for_equal_inputs() -> None:
    assert hashes(BASE) == hashes(Recipe(name="default", suite="bookworm"))
    assert BASE.hash == Recipe(name="default", suite="bookworm").hash
    # Package order and duplicates do not matter.
    shuffled = replace(BASE, packages=(*reversed(BASE.packages), BASE.packages[0]))
    assert hashes(shuffled) == hashes(BASE)
    assert shuffled.hash == BASE.hash


def test_hash_format_is_pinned() -> None:
    # The canonical JSON encoding is part of the cache layout: changing it orphans every cache.
    canonical = b'{"a":"\\u00e9","b":[1,2],"kind":"x"}'
    assert recipe.digest("x", {"b": [1, 2], "a": "é"}) == hashlib.sha256(canonical).hexdigest()[:16]
    assert recipe.digest("x", {"b": [1, 2], "a": "é"}) == "8cd6ead12218ed11"
    assert len(BASE.hash) == recipe.HASH_LEN


def test_package_change_rebuilds_base_and_rootfs_only() -> None:
    other = replace(BASE, packages=(*BASE.packages, "curl"))
    assert changed(hashes(BASE), hashes(other)) == {"base", "rootfs", "image"}


def test_suite_change_rebuilds_base_and_rootfs_only() -> None:
    assert changed(hashes(BASE), hashes(replace(BASE, suite="trixie"))) == {
        "base",
        "rootfs",
        "image",
    }


def test_agent_change_rebuilds_rootfs_only() -> None:
    edited = {**AGENT, "usr/lib/warden/warden/agent/guest.py": b"def main(): return 1\n"}
    assert changed(hashes(BASE), hashes(BASE, agent=edited)) == {"rootfs", "image"}
    renamed = {k.replace("guest.py", "guest2.py"): v for k, v in AGENT.items()}
    assert changed(hashes(BASE), hashes(BASE, agent=renamed)) == {"rootfs", "image"}


def test_init_script_change_rebuilds_initrd_only() -> None:
    assert changed(hashes(BASE), hashes(BASE, init=INIT_SCRIPT + "\n# edit\n")) == {
        "initrd",
        "image",
    }


def test_busybox_change_rebuilds_initrd_only() -> None:
    assert changed(hashes(BASE), hashes(BASE, busybox="c" * 64)) == {"initrd", "image"}


def test_module_list_change_rebuilds_initrd_only() -> None:
    more = replace(BASE, modules=(*BASE.modules, "virtio_rng"))
    assert changed(hashes(BASE), hashes(more)) == {"initrd", "image"}
    # Module order is load order, so it counts.
    swapped = replace(BASE, modules=tuple(reversed(BASE.modules)))
    assert changed(hashes(BASE), hashes(swapped)) == {"initrd", "image"}


def test_kernel_version_change_rebuilds_kernel_and_initrd() -> None:
    assert changed(hashes(BASE), hashes(BASE, kernel_version="6.1.200-1")) == {
        "kernel",
        "initrd",
        "image",
    }


def test_kernel_package_change_rebuilds_kernel_and_initrd() -> None:
    other = replace(BASE, kernel_package="linux-image-amd64")
    assert changed(hashes(BASE), hashes(other)) == {"kernel", "initrd", "image"}


def test_name_is_not_part_of_artifact_hashes() -> None:
    a, b = hashes(BASE), hashes(replace(BASE, name="other"))
    assert changed(a, b) == {"image"}


def test_unknown_recipe_lists_known_ones() -> None:
    with pytest.raises(ImageNotFoundError) as err:
        recipe.get_recipe("nope")
    assert "nope" in str(err.value) and "default" in str(err.value)
    assert recipe.known_recipes() == ["default"]


def test_default_recipe() -> None:
    r = recipe.get_recipe("default")
    assert r.name == "default"
    assert r.kernel_package == "linux-image-cloud-amd64"
    assert {"python3", "python3-cryptography", "python3-cffi-backend", "qemu-guest-agent"} <= set(
        r.packages
    )
    assert r.modules[:2] == ("virtio_mmio", "virtio_blk")


def test_host_suite(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\nID=debian\n')
    assert recipe.host_suite(f) == "bookworm"
    f.write_text('NAME="x"\n')
    with pytest.raises(HostError):
        recipe.host_suite(f)
    with pytest.raises(HostError):
        recipe.host_suite(tmp_path / "missing")


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "Bad Name"},
        {"suite": "bookworm/x"},
        {"packages": ("python3; rm",)},
        {"modules": ("a b",)},
    ],
)
def test_recipe_validates_fields(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(BASE, **bad)  # type: ignore[arg-type]
