"""The content-addressed image store under ``$WARDEN_HOME``.

::

    cache/kernel-<hash>/vmlinuz      Debian's bzImage; vmlinux, its uncompressed ELF, is what
                                     the manifest points at when the kernel can boot by PVH
                                     (+ the kernel .deb, so the initramfs rebuilds offline)
    cache/initrd-<hash>/initrd.img
    cache/base-<hash>/root/          the trimmed mmdebstrap tree the rootfs is made from
    cache/rootfs-<hash>/rootfs.sqfs
    cache/.lock                      flock held by builds and removals
    images/<name>.json               manifest: artifact paths (relative to $WARDEN_HOME),
                                     sha256 and size, recipe hash, kernel version

Artifacts are never modified in place: a build writes a temp dir and renames it into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden._errors import ImageError, ImageNotFoundError
from warden.config import Paths, open_private, private_dir, write_private

MANIFEST_FORMAT = 1
KINDS = ("kernel", "initrd", "rootfs")
ARTIFACT_FILES = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.sqfs"}
CACHE_DIR_RE = re.compile(r"^(kernel|initrd|base|rootfs)-[0-9a-f]+$")
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Image:
    name: str
    recipe_hash: str
    kernel_version: str
    built_at: str
    kernel: Artifact
    initrd: Artifact
    rootfs: Artifact


def build_hint(name: str, force: bool = False) -> str:
    return f"warden image build {name}" + (" --force" if force else "")


def manifest_path(paths: Paths, name: str) -> Path:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise ImageNotFoundError(f"{name!r} is not a valid image name")
    return paths.images / f"{name}.json"


# -- hashing -------------------------------------------------------------------------------------

_verified: dict[tuple[str, int, int, int, int, int], str] = {}
_verified_lock = threading.Lock()


def _stat_key(path: Path) -> tuple[str, int, int, int, int, int]:
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _remember(path: Path, digest: str) -> None:
    with _verified_lock:
        _verified[_stat_key(path)] = digest


def make_artifact(path: Path) -> Artifact:
    """Hash ``path`` (and remember it, so the first boot after a build does not rehash)."""
    key = _stat_key(path)
    digest = sha256_file(path)
    with _verified_lock:
        _verified[key] = digest
    return Artifact(path=path, sha256=digest, size=key[3])


def verify_image(image: Image) -> None:
    """Check the sha256 of the kernel, initrd and rootfs against the manifest.

    Results are memoized per process by (path, st_dev, st_ino, size, mtime, ctime), so
    repeated boots of an unchanged image do not rehash. Raises ImageError naming the file.
    """
    for kind in KINDS:
        art: Artifact = getattr(image, kind)
        fix = f"rebuild it with `{build_hint(image.name, force=True)}`"
        try:
            key = _stat_key(art.path)
        except OSError as exc:
            raise ImageError(
                f"image {image.name!r}: {kind} {art.path} is missing ({exc.strerror}); "
                f"rebuild it with `{build_hint(image.name)}`"
            ) from exc
        if key[3] != art.size:
            raise ImageError(
                f"image {image.name!r}: {kind} {art.path} has size {key[3]}, the manifest says "
                f"{art.size}; the file is corrupt, {fix}"
            )
        with _verified_lock:
            digest = _verified.get(key)
        if digest is None:
            digest = sha256_file(art.path)
            with _verified_lock:
                _verified[key] = digest
        if digest != art.sha256:
            raise ImageError(
                f"image {image.name!r}: {kind} {art.path} has sha256 {digest[:16]}..., the "
                f"manifest says {art.sha256[:16]}...; the file is corrupt, {fix}"
            )


# -- manifests -----------------------------------------------------------------------------------


def image_to_json(paths: Paths, image: Image, cache_dirs: list[str]) -> dict[str, Any]:
    def art(a: Artifact) -> dict[str, Any]:
        try:
            rel = str(a.path.relative_to(paths.home))
        except ValueError:
            rel = str(a.path)
        return {"path": rel, "sha256": a.sha256, "size": a.size}

    return {
        "format": MANIFEST_FORMAT,
        "name": image.name,
        "recipe_hash": image.recipe_hash,
        "kernel_version": image.kernel_version,
        "built_at": image.built_at,
        "kernel": art(image.kernel),
        "initrd": art(image.initrd),
        "rootfs": art(image.rootfs),
        "cache_dirs": sorted(cache_dirs),
    }


def _image_from_json(paths: Paths, data: dict[str, Any]) -> Image:
    def art(d: dict[str, Any]) -> Artifact:
        path = Path(d["path"])
        return Artifact(
            path=path if path.is_absolute() else paths.home / path,
            sha256=str(d["sha256"]),
            size=int(d["size"]),
        )

    return Image(
        name=str(data["name"]),
        recipe_hash=str(data["recipe_hash"]),
        kernel_version=str(data["kernel_version"]),
        built_at=str(data["built_at"]),
        kernel=art(data["kernel"]),
        initrd=art(data["initrd"]),
        rootfs=art(data["rootfs"]),
    )


def _read_manifest(paths: Paths, name: str) -> dict[str, Any]:
    path = manifest_path(paths, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImageNotFoundError(f"image {name!r} is not built; run `{build_hint(name)}`") from None
    except (OSError, ValueError) as exc:
        raise ImageError(
            f"image manifest {path} is unreadable ({exc}); rebuild it with "
            f"`{build_hint(name, force=True)}`"
        ) from exc
    if not isinstance(data, dict):
        raise ImageError(f"image manifest {path} is not a JSON object; rebuild the image")
    return data


def load_image(paths: Paths, name: str) -> Image:
    """The built image called ``name``; ImageNotFoundError says how to build it."""
    data = _read_manifest(paths, name)
    try:
        return _image_from_json(paths, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageError(
            f"image manifest {manifest_path(paths, name)} is incomplete ({exc!r}); rebuild it "
            f"with `{build_hint(name, force=True)}`"
        ) from exc


def write_manifest(paths: Paths, image: Image, cache_dirs: list[str]) -> Path:
    """Write ``images/<name>.json`` atomically."""
    private_dir(paths.images)
    dest = manifest_path(paths, image.name)
    write_private(
        dest, (json.dumps(image_to_json(paths, image, cache_dirs), indent=2) + "\n").encode()
    )
    return dest


def list_images(paths: Paths) -> list[Image]:
    """Every built image, sorted by name. Unreadable manifests are left out."""
    if not paths.images.is_dir():
        return []
    out: list[Image] = []
    for path in sorted(paths.images.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            out.append(load_image(paths, path.stem))
        except ImageError:
            continue
    return out


# -- locking and garbage collection --------------------------------------------------------------


@contextmanager
def cache_lock(paths: Paths, waiting: Callable[[bool], None] | None = None) -> Iterator[None]:
    """Hold the exclusive flock on ``cache/.lock`` (serializes builds and removals).

    If another process holds it, ``waiting(True)`` is called before blocking and
    ``waiting(False)`` once the lock is ours.
    """
    private_dir(paths.cache)
    fd = open_private(paths.cache / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if waiting is not None:
                waiting(False)
        yield
    finally:
        os.close(fd)


def referenced_cache_dirs(paths: Paths) -> set[str]:
    """The cache dir names that some manifest needs (unreadable manifests keep everything)."""
    keep: set[str] = set()
    if not paths.images.is_dir():
        return keep
    for path in paths.images.glob("*.json"):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
            dirs = data["cache_dirs"]
        except (OSError, ValueError, KeyError, TypeError):
            return {p.name for p in paths.cache.iterdir()} if paths.cache.is_dir() else keep
        keep.update(str(d) for d in dirs)
    return keep


def gc_cache(paths: Paths) -> list[Path]:
    """Delete cache dirs no manifest references, and temp dirs of dead builds.

    Call with :func:`cache_lock` held. Returns what was deleted.
    """
    if not paths.cache.is_dir():
        return []
    keep = referenced_cache_dirs(paths)
    removed: list[Path] = []
    for entry in sorted(paths.cache.iterdir()):
        stale_tmp = entry.name.startswith(TMP_PREFIX)
        unused = CACHE_DIR_RE.match(entry.name) is not None and entry.name not in keep
        if (stale_tmp or unused) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def remove_image(paths: Paths, name: str) -> None:
    """Delete the manifest of ``name``, then every cache dir no other manifest references."""
    path = manifest_path(paths, name)
    with cache_lock(paths):
        if not path.exists():
            raise ImageNotFoundError(f"image {name!r} is not built; nothing to remove")
        path.unlink()
        gc_cache(paths)
