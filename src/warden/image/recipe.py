"""What an image is made of, and the content hashes that name its cached artifacts.

A :class:`Recipe` is pure data. Each artifact gets its own hash over exactly the inputs that
change its bytes, so changing the agent rebuilds only the rootfs, and changing the init script
rebuilds only the initramfs:

* kernel: the kernel metapackage, and the real package and version it resolved to
* initrd: the kernel hash, the init script, the module list and the busybox binary
* base (the mmdebstrap tree): the suite and the package set
* rootfs: the base hash and the agent files (path and content)

Each hash also covers a format number, bumped when the code that builds that artifact changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from warden._errors import HostError, ImageNotFoundError

HASH_LEN = 16
"""Hex digits kept of each sha256: 64 bits name a cache dir."""

KERNEL_FORMAT = 2
INITRD_FORMAT = 1
BASE_FORMAT = 1
ROOTFS_FORMAT = 3
"""3: the account ``user``, no setuid/setgid bits, owners kept (not -all-root)."""

DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
DEFAULT_PACKAGES = (
    "python3",
    "python3-cryptography",
    "python3-cffi-backend",
    "qemu-guest-agent",
    "libsodium23",  # links' records: warden.channel.sodium
)
DEFAULT_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "squashfs",
    "overlay",
    "virtio_balloon",
    "qemu_fw_cfg",  # the channel secret: /sys/firmware/qemu_fw_cfg/by_name/opt/warden/key
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Recipe:
    """The inputs of one named image."""

    name: str
    suite: str
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    kernel_package: str = DEFAULT_KERNEL_PACKAGE
    modules: tuple[str, ...] = DEFAULT_MODULES

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad image name {self.name!r}: use [a-z0-9][a-z0-9._-]*")
        if not re.match(r"^[a-z][a-z0-9-]*$", self.suite):
            raise ValueError(f"bad suite {self.suite!r}")
        for pkg in (*self.packages, self.kernel_package):
            if not _PKG_RE.match(pkg):
                raise ValueError(f"bad Debian package name {pkg!r}")
        for mod in self.modules:
            if not _MODULE_RE.match(mod):
                raise ValueError(f"bad kernel module name {mod!r}")

    def canonical(self) -> dict[str, object]:
        """The recipe as plain data; package order does not matter, module order does."""
        return {
            "name": self.name,
            "suite": self.suite,
            "packages": sorted(set(self.packages)),
            "kernel_package": self.kernel_package,
            "modules": list(self.modules),
        }

    @property
    def hash(self) -> str:
        return digest("recipe", self.canonical())


def digest(kind: str, payload: Mapping[str, object]) -> str:
    """A short sha256 of ``payload`` as canonical JSON, tagged with ``kind``."""
    blob = json.dumps(
        {"kind": kind, **payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_LEN]


def kernel_hash(recipe: Recipe, package: str, version: str) -> str:
    """A Debian package name and version name one .deb (apt checks its sha256 on download)."""
    return digest(
        "kernel",
        {
            "format": KERNEL_FORMAT,
            "meta": recipe.kernel_package,
            "package": package,
            "version": version,
        },
    )


def initrd_hash(kernel: str, init_script: str, modules: Sequence[str], busybox_sha256: str) -> str:
    return digest(
        "initrd",
        {
            "format": INITRD_FORMAT,
            "kernel": kernel,
            "init": hashlib.sha256(init_script.encode()).hexdigest(),
            "modules": list(modules),
            "busybox": busybox_sha256,
        },
    )


def base_hash(recipe: Recipe) -> str:
    return digest(
        "base",
        {"format": BASE_FORMAT, "suite": recipe.suite, "packages": sorted(set(recipe.packages))},
    )


def rootfs_hash(base: str, agent_files: Mapping[str, bytes]) -> str:
    files = {path: hashlib.sha256(data).hexdigest() for path, data in agent_files.items()}
    return digest("rootfs", {"format": ROOTFS_FORMAT, "base": base, "agent": files})


def image_hash(recipe: Recipe, kernel: str, initrd: str, rootfs: str) -> str:
    """The recipe hash of a built image: the recipe and the hashes of its three artifacts."""
    return digest(
        "image", {"recipe": recipe.hash, "kernel": kernel, "initrd": initrd, "rootfs": rootfs}
    )


# -- the named recipes ---------------------------------------------------------------------------


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian codename (``VERSION_CODENAME``): the guest uses the same suite."""
    try:
        text = os_release.read_text()
    except OSError as exc:
        raise HostError(f"cannot read {os_release} to find the Debian suite: {exc}") from exc
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "VERSION_CODENAME":
            suite = value.strip().strip("\"'")
            if suite:
                return suite
    raise HostError(f"{os_release} has no VERSION_CODENAME; warden builds images on Debian hosts")


def _default() -> Recipe:
    return Recipe(name="default", suite=host_suite())


RECIPES: dict[str, Callable[[], Recipe]] = {"default": _default}
"""Every recipe warden knows, by name."""


def known_recipes() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ImageNotFoundError lists the known ones."""
    factory = RECIPES.get(name)
    if factory is None:
        raise ImageNotFoundError(
            f"no image recipe named {name!r}; known recipes: {', '.join(known_recipes())}"
        )
    return factory()
