"""Build a named image: each artifact only when its content-addressed cache dir is missing.

Steps (each reported through ``progress`` as :class:`StepEvent`)::

    host      root, host tools, static busybox
    wait      (only when another build holds cache/.lock)
    resolve   linux-image-cloud-amd64 -> the real package apt would install
    kernel    apt-get download, dpkg-deb -x; keep vmlinuz, its uncompressed ELF vmlinux (booted
              by PVH when the kernel has the PVH note), and the .deb
    initrd    modules (via depmod's modules.dep) + busybox + /init -> initrd.img
    base      mmdebstrap --variant=essential + packages, trimmed (cached apart from the agent)
    rootfs    base + agent files, compiled, -> rootfs.sqfs
    manifest  sha256 of the three artifacts -> images/<name>.json; unreferenced dirs removed

Every artifact is built in a temp dir inside the cache and renamed into place; temp dirs are
removed in ``finally``. An flock on ``cache/.lock`` serializes concurrent builds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from warden._errors import HostError, ImageBuildError
from warden.agent import bundle
from warden.config import Paths, private_dir, restrict
from warden.image import initramfs, kernel, recipe, rootfs, store, tools

StepStatus = Literal["start", "done", "cached", "failed"]

STEPS: dict[str, str] = {
    "host": "check host",
    "wait": "wait for another build",
    "resolve": "resolve kernel package",
    "kernel": "kernel",
    "initrd": "initramfs",
    "base": "base system (mmdebstrap)",
    "rootfs": "rootfs (agent + squashfs)",
    "manifest": "manifest",
}
"""Step keys, in build order, and their titles."""

BUILD_TOOLS = ("apt-cache", "apt-get", "chroot", "cp", "depmod", "dpkg-deb", "mksquashfs")
BASE_TOOLS = ("mmdebstrap",)
KERNEL_DEB = "linux-image.deb"
KERNEL_INFO = "kernel.json"
BZIMAGE = "vmlinuz"
PVH_KERNEL = "vmlinux"
"""The uncompressed ELF kernel, booted by QEMU through PVH (no in-guest decompression)."""


@dataclass(frozen=True)
class StepEvent:
    """One step changed state. ``elapsed`` is seconds since the step started."""

    step: str
    title: str
    status: StepStatus
    elapsed: float
    detail: str = ""


class _StepState:
    def __init__(self) -> None:
        self.status: StepStatus = "done"
        self.detail = ""


class _Reporter:
    def __init__(self, progress: Callable[[StepEvent], None] | None) -> None:
        self._progress = progress
        self._started: dict[str, float] = {}

    def _emit(self, key: str, status: StepStatus, elapsed: float, detail: str) -> None:
        if self._progress is not None:
            self._progress(StepEvent(key, STEPS[key], status, elapsed, detail))

    def waiting(self, blocked: bool) -> None:
        """The cache lock callback: report the wait for another build as a step."""
        if blocked:
            self._started["wait"] = time.monotonic()
            self._emit("wait", "start", 0.0, "")
        else:
            elapsed = time.monotonic() - self._started.pop("wait", time.monotonic())
            self._emit("wait", "done", elapsed, str(Path("cache") / store.LOCK_NAME))

    @contextmanager
    def step(self, key: str) -> Iterator[_StepState]:
        state = _StepState()
        start = time.monotonic()
        self._emit(key, "start", 0.0, "")
        try:
            yield state
        except BaseException as exc:
            self._emit(key, "failed", time.monotonic() - start, type(exc).__name__)
            raise
        self._emit(key, state.status, time.monotonic() - start, state.detail)


def check_host(need_base: bool = True) -> Path:
    """Raise HostError unless this host can build images. Returns the static busybox."""
    if os.geteuid() != 0:
        raise HostError(
            "building images needs root (mmdebstrap --mode=root, chroot, device nodes); "
            "run the build as root"
        )
    tools.require_tools(*BUILD_TOOLS, *(BASE_TOOLS if need_base else ()))
    return initramfs.find_busybox()


@contextmanager
def _temp_dir(paths: Paths) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=store.TMP_PREFIX, dir=paths.cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(paths: Paths, final: Path, build: Callable[[Path, Path], None]) -> None:
    """Run ``build(out_dir, work_dir)`` in a temp dir, then rename out_dir to ``final``."""
    with _temp_dir(paths) as tmp:
        out = tmp / "out"
        work = tmp / "work"
        out.mkdir()
        work.mkdir()
        build(out, work)
        restrict(out)  # root-only: 0700, its files 0600
        if final.exists():  # --force: move the old one aside; it is deleted with tmp
            final.rename(tmp / "old")
        out.rename(final)


def _agent_files() -> dict[str, bytes]:
    try:
        return bundle.guest_files()
    except FileNotFoundError as exc:
        raise ImageBuildError(
            "rootfs",
            None,
            f"    {exc}",
            "a guest agent source file is missing (see warden.agent.bundle.guest_files)",
        ) from exc


def _read_kernel_info(kdir: Path) -> dict[str, str]:
    try:
        data = json.loads((kdir / KERNEL_INFO).read_text())
        return {str(k): str(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageBuildError(
            "kernel",
            None,
            f"    cannot read {kdir / KERNEL_INFO}: {exc}",
            "the cached kernel is damaged; build again with --force",
        ) from exc


@dataclass(frozen=True)
class _Kernel:
    """The kernel step's result: its cache key, dir and ``kernel.json``."""

    hash: str
    dir: Path
    info: dict[str, str]


@dataclass(frozen=True)
class _Cached:
    """A cached artifact: its content hash (the cache key) and its dir."""

    hash: str
    dir: Path


def _make_kernel(kpkg: kernel.KernelPackage, out: Path, work: Path) -> None:
    """Download and unpack the kernel .deb into ``out``: vmlinuz, vmlinux (PVH), the .deb."""
    deb = kernel.download_kernel(kpkg, work / "deb")
    tools.run("extract kernel", ["dpkg-deb", "-x", str(deb), str(work / "x")])
    vmlinuz = work / "x" / "boot" / f"vmlinuz-{kpkg.release}"
    if not vmlinuz.is_file():
        raise ImageBuildError("kernel", None, f"    {kpkg.package} has no boot/{vmlinuz.name}")
    shutil.copyfile(vmlinuz, out / BZIMAGE)
    elf = kernel.extract_vmlinux(vmlinuz, work)
    if elf is not None:
        (out / PVH_KERNEL).write_bytes(elf)
    shutil.copyfile(deb, out / KERNEL_DEB)
    info = {
        "package": kpkg.package,
        "version": kpkg.version,
        "release": kpkg.release,
        "deb_sha256": store.sha256_file(deb),
        "boot_file": PVH_KERNEL if elf is not None else BZIMAGE,
    }
    (out / KERNEL_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _remove_stale_temp_dirs(paths: Paths) -> None:
    """Remove the temp dirs of builds that were killed (call with the cache lock held)."""
    for entry in paths.cache.iterdir():
        if entry.name.startswith(store.TMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)


class _ImageBuild:
    """The steps of one :func:`build_image` run, each a method, in build order."""

    def __init__(
        self,
        paths: Paths,
        name: str,
        rcp: recipe.Recipe,
        rep: _Reporter,
        force: bool,
        busybox: Path,
    ) -> None:
        self.paths = paths
        self.name = name
        self.rcp = rcp
        self.rep = rep
        self.force = force
        self.busybox = busybox

    def _stale(self, final: Path) -> bool:
        """Whether the cache dir ``final`` must be built: it is missing, or ``--force``."""
        return self.force or not final.is_dir()

    def _ensure(self, st: _StepState, final: Path, make: Callable[[Path, Path], None]) -> None:
        """Publish ``final`` with ``make`` unless it is cached (and not ``--force``)."""
        if self._stale(final):
            _publish(self.paths, final, make)
        else:
            st.status = "cached"

    def resolve_step(self) -> tuple[kernel.KernelPackage, str]:
        """The real kernel package apt would install, and the kernel's cache key."""
        with self.rep.step("resolve") as st:
            kpkg = kernel.resolve_kernel_package(self.rcp.kernel_package)
            khash = recipe.kernel_hash(self.rcp, kpkg.package, kpkg.version)
            st.detail = f"{kpkg.package} {kpkg.version}"
        return kpkg, khash

    def kernel_step(self, kpkg: kernel.KernelPackage, khash: str) -> _Kernel:
        """The kernel dir: vmlinuz, vmlinux when it can boot by PVH, the .deb, kernel.json."""
        kdir = self.paths.cache / f"kernel-{khash}"
        with self.rep.step("kernel") as st:
            self._ensure(st, kdir, lambda out, work: _make_kernel(kpkg, out, work))
            kinfo = _read_kernel_info(kdir)
            st.detail = f"{kinfo['release']}, boots {kinfo.get('boot_file', BZIMAGE)}"
        return _Kernel(khash, kdir, kinfo)

    def initrd_step(self, kern: _Kernel) -> _Cached:
        """The initramfs: the recipe's modules, busybox and /init."""
        bb_sha = initramfs.file_sha256(self.busybox)
        ihash = recipe.initrd_hash(kern.hash, initramfs.INIT_SCRIPT, self.rcp.modules, bb_sha)
        idir = self.paths.cache / f"initrd-{ihash}"

        def make_initrd(out: Path, work: Path) -> None:
            extracted = kernel.extract_kernel(
                kern.dir / KERNEL_DEB, work / "x", kern.info["release"]
            )
            mods = kernel.resolve_modules(extracted, self.rcp.modules)
            blobs = [(m.name, kernel.module_bytes(m.path)) for m in mods]
            with (out / store.ARTIFACT_FILES["initrd"]).open("wb") as f:
                initramfs.write_initramfs(f, busybox=self.busybox, modules=blobs)

        with self.rep.step("initrd") as st:
            self._ensure(st, idir, make_initrd)
        return _Cached(ihash, idir)

    def base_step(self) -> _Cached:
        """The trimmed mmdebstrap root, cached apart from the agent."""
        rcp = self.rcp
        bhash = recipe.base_hash(rcp)
        bdir = self.paths.cache / f"base-{bhash}"

        def make_base(out: Path, work: Path) -> None:
            rootfs.build_base(out / "root", rcp.suite, rcp.packages, work)

        with self.rep.step("base") as st:
            if self._stale(bdir):
                tools.require_tools(*BASE_TOOLS)
                _publish(self.paths, bdir, make_base)
            else:
                st.status = "cached"
            st.detail = f"{rcp.suite}: {', '.join(sorted(set(rcp.packages)))}"
        return _Cached(bhash, bdir)

    def rootfs_step(self, base: _Cached) -> _Cached:
        """The base plus the agent's files, squashed into rootfs.sqfs."""
        with self.rep.step("rootfs") as st:
            files = _agent_files()
            rhash = recipe.rootfs_hash(base.hash, files)
            rdir = self.paths.cache / f"rootfs-{rhash}"

            def make_rootfs(out: Path, work: Path) -> None:
                rootfs.build_rootfs(
                    base.dir / "root",
                    files,
                    "/" + bundle.GUEST_ROOT,
                    out / store.ARTIFACT_FILES["rootfs"],
                    work,
                )

            self._ensure(st, rdir, make_rootfs)
        return _Cached(rhash, rdir)

    def manifest_step(
        self, kern: _Kernel, initrd: _Cached, base: _Cached, root: _Cached
    ) -> store.Image:
        """Write images/<name>.json and remove the cache dirs no manifest references."""
        with self.rep.step("manifest") as st:
            image = store.Image(
                name=self.rcp.name,
                recipe_hash=recipe.image_hash(self.rcp, kern.hash, initrd.hash, root.hash),
                kernel_version=kern.info["release"],
                built_at=datetime.now(UTC).isoformat(timespec="seconds"),
                kernel=store.make_artifact(kern.dir / kern.info.get("boot_file", BZIMAGE)),
                initrd=store.make_artifact(initrd.dir / store.ARTIFACT_FILES["initrd"]),
                rootfs=store.make_artifact(root.dir / store.ARTIFACT_FILES["rootfs"]),
            )
            made = (kern.dir, initrd.dir, base.dir, root.dir)
            for d in made:
                restrict(d)  # also what an older warden left readable by all
            store.write_manifest(self.paths, image, [d.name for d in made])
            removed = store.gc_cache(self.paths)
            st.detail = f"{store.manifest_path(self.paths, self.name)}" + (
                f" (removed {len(removed)} unused cache dirs)" if removed else ""
            )
        return image


def build_image(
    paths: Paths,
    name: str = "default",
    progress: Callable[[StepEvent], None] | None = None,
    force: bool = False,
) -> store.Image:
    """Build (or reuse from the cache) every artifact of image ``name`` and write its manifest.

    Raises ImageNotFoundError for an unknown recipe, HostError when the host lacks something,
    and ImageBuildError when a step fails.
    """
    rcp = recipe.get_recipe(name)
    rep = _Reporter(progress)
    with rep.step("host"):
        busybox = check_host()
    private_dir(paths.cache)

    with store.cache_lock(paths, rep.waiting):
        _remove_stale_temp_dirs(paths)
        steps = _ImageBuild(paths, name, rcp, rep, force, busybox)
        kpkg, khash = steps.resolve_step()
        kern = steps.kernel_step(kpkg, khash)
        initrd = steps.initrd_step(kern)
        base = steps.base_step()
        root = steps.rootfs_step(base)
        return steps.manifest_step(kern, initrd, base, root)
