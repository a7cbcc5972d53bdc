"""The content-addressed image store under ``$WARDEN_HOME``.

::

    cache/kernel-<hash>/vmlinuz      Debian's bzImage; vmlinux, its uncompressed ELF, is what
                                     the manifest points at when the kernel can boot by PVH
                                     (+ the kernel .deb, so the initramfs rebuilds offline)
    cache/initrd-<hash>/initrd.img
    cache/base-<hash>/root/          the trimmed mmdebstrap tree the rootfs is made from
    cache/rootfs-<hash>/rootfs.sqfs
    cache/.lock                      flock held by builds and removals
    cache/verified.json              SHA-256 of files already verified, by their stat
                                     (``seal/digests.py``): a new process does not rehash
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warden._errors import ImageError, ImageNotFoundError
from warden.config import Paths, open_private, private_dir, write_private
from warden.seal.digests import DigestRecord

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
    home: Path | None = field(default=None, compare=False, repr=False)
    """The ``$WARDEN_HOME`` it was loaded from: where its verified digests are remembered."""


def build_hint(name: str, force: bool = False) -> str:
    return f"warden image build {name}" + (" --force" if force else "")


def manifest_path(paths: Paths, name: str) -> Path:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise ImageNotFoundError(f"{name!r} is not a valid image name")
    return paths.images / f"{name}.json"


# -- hashing -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def digest_record(paths: Paths | None) -> DigestRecord:
    """Where verified digests are remembered: ``cache/verified.json`` (``seal/digests.py``);
    with no ``paths``, in this process only."""
    return DigestRecord(paths.cache if paths is not None else None)


def make_artifact(path: Path) -> Artifact:
    """Hash ``path`` for a manifest."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        digest = digest_record(None).digest(path, fd)
    finally:
        os.close(fd)
    return Artifact(path=path, sha256=digest, size=size)


def verify_image(image: Image) -> None:
    """Check the sha256 of the kernel, initrd and rootfs against the manifest.

    A file is hashed once: its digest is remembered by (path, st_dev, st_ino, size, mtime,
    ctime) in this process and, for an image loaded from ``$WARDEN_HOME``, in the root-only
    record ``cache/verified.json`` (``seal/digests.py`` says why that is sound), so a new
    process does not hash an unchanged image again. Raises ImageError naming the file.
    """
    record = digest_record(Paths(image.home) if image.home is not None else None)
    for kind in KINDS:
        _verify_artifact(image, kind, record)


def _verify_artifact(image: Image, kind: str, record: DigestRecord) -> None:
    art: Artifact = getattr(image, kind)
    fix = f"rebuild it with `{build_hint(image.name, force=True)}`"
    try:
        fd = os.open(art.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(
            f"image {image.name!r}: {kind} {art.path} is missing ({exc.strerror}); "
            f"rebuild it with `{build_hint(image.name)}`"
        ) from exc
    try:
        size = os.fstat(fd).st_size
        if size != art.size:
            raise ImageError(
                f"image {image.name!r}: {kind} {art.path} has size {size}, the manifest says "
                f"{art.size}; the file is corrupt, {fix}"
            )
        digest = record.digest(art.path, fd)
    finally:
        os.close(fd)
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
        home=paths.home,
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
