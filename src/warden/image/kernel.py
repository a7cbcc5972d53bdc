"""Debian's cloud kernel, taken from its .deb without installing it on the host.

``resolve_kernel_package`` turns the metapackage (``linux-image-cloud-amd64``) into the real
package apt would install; ``download_kernel`` fetches its .deb; ``extract_kernel`` unpacks it
and generates ``modules.dep`` (the deb ships none); ``resolve_modules`` orders the wanted
modules and their dependencies for loading.

``extract_vmlinux`` takes the uncompressed ELF kernel out of the bzImage. QEMU boots that ELF
through its PVH entry point, which skips the in-guest decompression and relocation: measured
under TCG, the probe boot reaches ``/init`` about 0.4 s sooner (1.6 s instead of 2.0 s).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from warden._errors import ImageBuildError
from warden.image import tools

APT_HINT = "run `apt-get update` so apt knows the current kernel package, then build again"
_COMPRESSED_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class KernelPackage:
    """The real kernel package a metapackage resolved to."""

    meta: str
    package: str
    version: str
    deb_sha256: str

    @property
    def release(self) -> str:
        """The kernel release (``uname -r``), e.g. ``6.1.0-56-cloud-amd64``."""
        return self.package.removeprefix("linux-image-")


@dataclass(frozen=True)
class ExtractedKernel:
    root: Path
    release: str
    vmlinuz: Path

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


@dataclass(frozen=True)
class Module:
    """One module to load: its name (``virtio_blk``) and its file in the extracted tree."""

    name: str
    path: Path


def _fields(stanza: str) -> dict[str, str]:
    out: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            out[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def _apt_show(package: str) -> dict[str, str]:
    out = tools.run(
        "resolve kernel",
        ["apt-cache", "show", "--no-all-versions", package],
        hint=APT_HINT,
    )
    stanza = out.strip().split("\n\n")[0]
    fields = _fields(stanza)
    if fields.get("Package") != package:
        raise ImageBuildError("resolve kernel", ["apt-cache", "show", package], out, APT_HINT)
    return fields


def resolve_kernel_package(meta: str) -> KernelPackage:
    """Resolve ``meta`` (e.g. ``linux-image-cloud-amd64``) to apt's candidate real package.

    Debian's metapackage pins the exact version (``Depends: linux-image-X (= V)``), so one
    ``apt-cache show`` is enough; the .deb's sha256 is looked up only when it is downloaded.
    """
    if re.match(r"^linux-image-\d", meta):
        fields = _apt_show(meta)
        return KernelPackage(meta, meta, fields.get("Version", ""), fields.get("SHA256", ""))
    depends = _apt_show(meta).get("Depends", "")
    for alt in re.split(r"[,|]", depends):
        m = re.match(r"^\s*(linux-image-\d\S*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alt)
        if m:
            package, version = m.group(1), m.group(2)
            if version:
                return KernelPackage(meta, package, version, "")
            fields = _apt_show(package)
            return KernelPackage(meta, package, fields.get("Version", ""), fields.get("SHA256", ""))
    raise ImageBuildError(
        "resolve kernel",
        ["apt-cache", "show", "--no-all-versions", meta],
        f"    Depends: {depends}",
        f"{meta} does not depend on a linux-image-<version> package",
    )


def deb_sha256(pkg: KernelPackage) -> str:
    """The sha256 apt's index gives for the exact package version ('' if it gives none)."""
    if pkg.deb_sha256:
        return pkg.deb_sha256
    out = tools.run(
        "download kernel",
        ["apt-cache", "show", f"{pkg.package}={pkg.version}"],
        hint=APT_HINT,
    )
    return _fields(out.strip().split("\n\n")[0]).get("SHA256", "")


def download_kernel(pkg: KernelPackage, dest: Path) -> Path:
    """``apt-get download`` the package's .deb into ``dest`` and check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    tools.run(
        "download kernel",
        [
            "apt-get",
            "download",
            "-q",
            # apt drops to the _apt user for downloads; that user cannot write our temp dir.
            "-o",
            "APT::Sandbox::User=root",
            f"{pkg.package}={pkg.version}",
        ],
        cwd=dest,
        hint=APT_HINT,
        timeout=900,
    )
    debs = sorted(dest.glob(f"{pkg.package}_*.deb"))
    if len(debs) != 1:
        raise ImageBuildError(
            "download kernel", None, f"    expected one .deb in {dest}, found {debs}", APT_HINT
        )
    deb = debs[0]
    want = deb_sha256(pkg)
    if want:
        h = hashlib.sha256()
        with deb.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != want:
            raise ImageBuildError(
                "download kernel",
                None,
                f"    {deb.name}: sha256 {h.hexdigest()} != {want} from apt",
                APT_HINT,
            )
    return deb


def extract_kernel(deb: Path, root: Path, release: str) -> ExtractedKernel:
    """Unpack ``deb`` into ``root`` and run depmod there."""
    root.mkdir(parents=True, exist_ok=True)
    tools.run("extract kernel", ["dpkg-deb", "-x", str(deb), str(root)])
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        found = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
        raise ImageBuildError(
            "extract kernel",
            ["dpkg-deb", "-x", str(deb)],
            f"    no boot/vmlinuz-{release} in the package (found: {found})",
        )
    kernel = ExtractedKernel(root, release, vmlinuz)
    if not kernel.modules_dir.is_dir():
        raise ImageBuildError(
            "extract kernel", None, f"    the package has no lib/modules/{release}"
        )
    tools.run("depmod", ["depmod", "-b", str(root), release])
    return kernel


# -- modules -------------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/block/virtio_blk.ko.xz`` -> ``virtio_blk`` (dashes become underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (*_COMPRESSED_SUFFIXES, ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep: module name -> (its path, the paths it depends on)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, _, deps = line.partition(":")
        out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


def parse_builtin(text: str) -> set[str]:
    """The names of the modules listed in modules.builtin (built into the kernel)."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(dep_text: str, builtin_text: str, wanted: Sequence[str]) -> list[str]:
    """The module paths to insmod, dependencies first, for the ``wanted`` module names.

    modules.dep lists each module's full dependency closure; loading that list from its end
    first (as modprobe does) puts every dependency before its users. Built-in modules are
    skipped; an unknown name raises KeyError.
    """
    deps = parse_modules_dep(dep_text)
    path_to_name = {path: name for name, (path, _) in deps.items()}
    builtin = parse_builtin(builtin_text)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in stack:
            raise ValueError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in deps:
            raise KeyError(name)
        path, needs = deps[name]
        for dep_path in reversed(needs):
            visit(path_to_name.get(dep_path, module_name(dep_path)), (*stack, name))
        seen.add(name)
        order.append(path)

    for want in wanted:
        visit(want.replace("-", "_"), ())
    return order


def resolve_modules(kernel: ExtractedKernel, wanted: Sequence[str]) -> list[Module]:
    """The wanted modules plus their dependencies, in load order, as files of ``kernel``."""
    mdir = kernel.modules_dir
    dep_text = (mdir / "modules.dep").read_text()
    builtin_file = mdir / "modules.builtin"
    builtin_text = builtin_file.read_text() if builtin_file.exists() else ""
    try:
        paths = load_order(dep_text, builtin_text, wanted)
    except KeyError as exc:
        raise ImageBuildError(
            "resolve modules",
            None,
            f"    kernel {kernel.release} has no module {exc.args[0]!r} (not in modules.dep "
            "nor modules.builtin)",
            "fix the module list of the recipe",
        ) from exc
    return [Module(module_name(p), mdir / p) for p in paths]


def module_bytes(path: Path) -> bytes:
    """The module's ELF bytes, decompressed on the host if it is .ko.xz/.ko.gz/.ko.zst."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        tools.require_tools("zstd")
        out = path.with_name(name.removesuffix(".zst"))
        tools.run("decompress module", ["zstd", "-q", "-d", "-f", str(path), "-o", str(out)])
        return out.read_bytes()
    return path.read_bytes()


# -- the uncompressed kernel for PVH boot --------------------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18
"""The ELF note QEMU looks for to boot an ELF kernel through its PVH entry point."""

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
)


def bzimage_payload(image: bytes) -> tuple[str, bytes] | None:
    """The compressed kernel inside a bzImage: (format, bytes), or None if not found.

    Boot protocol 2.08+ records where the payload lies (``payload_offset``/``payload_length``
    in the setup header, from the start of the protected-mode code).
    """
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    if struct.unpack_from("<H", image, 0x206)[0] < 0x0208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    for magic, kind in _MAGICS:
        if payload.startswith(magic):
            return kind, payload
    return None


def has_pvh_note(elf: bytes) -> bool:
    """True if this ELF64 kernel carries the Xen PVH entry note QEMU boots it by."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ph = phoff + i * phentsize
        if struct.unpack_from("<I", elf, ph)[0] != 4:  # PT_NOTE
            continue
        p_offset = struct.unpack_from("<Q", elf, ph + 8)[0]
        p_filesz = struct.unpack_from("<Q", elf, ph + 32)[0]
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\x00" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress(kind: str, payload: bytes, workdir: Path) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if kind in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(payload)
    # lz4 and zstd have no decoder in the standard library. The kernel build appends the
    # uncompressed size (4 bytes) after the stream; the tools would call that garbage.
    tool = {"lz4": "lz4", "zstd": "zstd"}[kind]
    tools.require_tools(tool)
    src = workdir / f"payload.{kind}"
    out = workdir / "vmlinux.out"
    src.write_bytes(payload[:-4])
    argv = [tool, "-d", "-q", "-f", str(src)]
    argv += [str(out)] if kind == "lz4" else ["-o", str(out)]
    tools.run("extract vmlinux", argv)
    data = out.read_bytes()
    src.unlink()
    out.unlink()
    return data


def extract_vmlinux(bzimage: Path, workdir: Path) -> bytes | None:
    """The uncompressed ELF kernel of ``bzimage`` if QEMU can boot it by PVH, else None."""
    found = bzimage_payload(bzimage.read_bytes())
    if found is None:
        return None
    kind, payload = found
    elf = _decompress(kind, payload, workdir)
    size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if size != len(elf):
        raise ImageBuildError(
            "extract vmlinux",
            None,
            f"    {bzimage.name}: the {kind} payload gave {len(elf)} bytes, its trailer says "
            f"{size}",
        )
    return elf if has_pvh_note(elf) else None
