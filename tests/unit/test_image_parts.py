"""Pure parts of the image build: module order, apt sources, the initramfs, tool errors."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from warden._errors import HostError, ImageBuildError
from warden.image import initramfs, kernel, rootfs, tools
from warden.image.cpio import CpioWriter

from .test_cpio import parse_newc

_V = "kernel/drivers/virtio"
_CORE = f"{_V}/virtio.ko {_V}/virtio_ring.ko"
MODULES_DEP = "\n".join(
    [
        f"{_V}/virtio_mmio.ko: {_CORE}",
        f"kernel/drivers/block/virtio_blk.ko: {_CORE}",
        f"kernel/drivers/char/virtio_console.ko: {_CORE}",
        "kernel/fs/squashfs/squashfs.ko:",
        "kernel/fs/overlayfs/overlay.ko:",
        f"{_V}/virtio.ko: {_V}/virtio_ring.ko",
        f"{_V}/virtio_ring.ko:",
        f"kernel/drivers/char/hw_random/virtio-rng.ko.xz: {_CORE}",
        f"{_V}/virtio_pci.ko: {_V}/virtio_pci_legacy_dev.ko {_V}/virtio_pci_modern_dev.ko {_CORE}",
        f"{_V}/virtio_pci_legacy_dev.ko:",
        f"{_V}/virtio_pci_modern_dev.ko:",
    ]
)
BUILTIN = "kernel/fs/overlayfs/overlay.ko\n"


def names(paths: list[str]) -> list[str]:
    return [kernel.module_name(p) for p in paths]


def test_load_order_puts_dependencies_first() -> None:
    order = kernel.load_order(
        MODULES_DEP, "", ["virtio_mmio", "virtio_blk", "virtio_console", "squashfs", "overlay"]
    )
    assert names(order) == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "virtio_console",
        "squashfs",
        "overlay",
    ]
    order = kernel.load_order(MODULES_DEP, "", ["virtio_pci"])
    assert names(order)[-1] == "virtio_pci"
    assert names(order).index("virtio_ring") < names(order).index("virtio")


def test_load_order_skips_builtins_and_normalizes_dashes() -> None:
    order = kernel.load_order(MODULES_DEP, BUILTIN, ["overlay", "virtio-rng"])
    assert names(order) == ["virtio_ring", "virtio", "virtio_rng"]
    assert order[-1].endswith("virtio-rng.ko.xz")


def test_load_order_unknown_module() -> None:
    with pytest.raises(KeyError):
        kernel.load_order(MODULES_DEP, "", ["nope"])


def test_module_bytes_decompresses(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(100)
    (tmp_path / "a.ko").write_bytes(elf)
    (tmp_path / "b.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(elf))
    for name in ("a.ko", "b.ko.xz", "c.ko.gz"):
        assert kernel.module_bytes(tmp_path / name) == elf
    if shutil.which("zstd"):
        subprocess.run(
            ["zstd", "-q", str(tmp_path / "a.ko"), "-o", str(tmp_path / "d.ko.zst")], check=True
        )
        assert kernel.module_bytes(tmp_path / "d.ko.zst") == elf


def test_kernel_release_from_package() -> None:
    pkg = kernel.KernelPackage(
        "linux-image-cloud-amd64", "linux-image-6.1.0-56-cloud-amd64", "", ""
    )
    assert pkg.release == "6.1.0-56-cloud-amd64"


# -- apt sources -------------------------------------------------------------------------------


def test_host_sources_keep_the_suite_and_its_companions(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://other.example/repo stable main\n"
    )
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment inside\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm-updates bookworm-security trixie\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.example/\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (etc / "sources.list.d" / "x.list.disabled").write_text("deb http://ignored/ bookworm main\n")
    found = rootfs.host_sources_for("bookworm", etc)
    assert [(s.uris, s.suites, s.components) for s in found] == [
        (["http://mirror.example/debian"], ["bookworm"], ["main", "contrib"]),
        (["http://mirror.example/debian"], ["bookworm-updates", "bookworm-security"], ["main"]),
    ]
    assert found[0].options == {"Architectures": "amd64", "Signed-By": "/k.gpg"}
    text = found[1].deb822()
    assert "Suites: bookworm-updates bookworm-security\n" in text
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" in text


def test_trim_tree_keeps_copyrights(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel in (
        "usr/share/doc/pkg/copyright",
        "usr/share/doc/pkg/changelog.gz",
        "usr/share/man/man1/x.1.gz",
        "usr/share/locale/de/LC_MESSAGES/x.mo",
        "var/lib/apt/lists/foo_Packages",
        "etc/resolv.conf",
        "usr/bin/python3",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    rootfs.trim_tree(root)
    rootfs.finish_tree(root)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["etc/hostname", "usr/bin/python3", "usr/share/doc/pkg/copyright"]
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "root").stat().st_mode) == 0o700
    assert (root / "etc/hostname").read_text() == "warden\n"


def test_write_agent_refuses_escapes(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError):
        rootfs.write_agent(tmp_path, {"../evil": b""})
    rootfs.write_agent(tmp_path, {"usr/lib/warden/a.py": b"x = 1\n"})
    assert (tmp_path / "usr/lib/warden/a.py").stat().st_mtime == rootfs.AGENT_MTIME


# -- initramfs ---------------------------------------------------------------------------------


def test_init_script_is_valid_sh() -> None:
    sh = shutil.which("busybox") or "/bin/sh"
    argv = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
    subprocess.run(argv, input=initramfs.INIT_SCRIPT.encode(), check=True)


def test_init_script_follows_the_contract() -> None:
    s = initramfs.INIT_SCRIPT
    assert s.startswith("#!/bin/sh\n")
    assert "exec switch_root /newroot /usr/bin/python3 -E -s -S /usr/lib/warden/agent_main.py" in s
    assert "/usr/sbin/qemu-ga --method=virtio-serial" in s
    assert "org.qemu.guest_agent.0" in s
    assert "echo WARDEN-PROBE-OK" in s
    assert "mount -t squashfs -o ro /dev/vda" in s
    for d in ("dev", "proc", "sys"):
        assert "for d in dev proc sys" in s and f"/{d}" in s
    assert "mkdir -m 1777 /newroot/tmp" in s
    # Single quotes would end the quoted rootcheck program early.
    assert "'" not in initramfs._ROOTCHECK_PY
    compile(initramfs._ROOTCHECK_PY, "rootcheck", "exec")


def test_write_initramfs_contents(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    buf = io.BytesIO()
    initramfs.write_initramfs(
        buf, busybox=busybox, modules=[("virtio_ring", b"ring"), ("virtio", b"virtio")]
    )
    members = {m.name: m for m in parse_newc(buf.getvalue())}
    assert members["init"].data == initramfs.INIT_SCRIPT.encode()
    assert stat.S_IMODE(members["init"].mode) == 0o755
    assert members["bin/busybox"].data == busybox.read_bytes()
    for applet in ("sh", "mount", "insmod", "switch_root", "poweroff"):
        assert stat.S_ISLNK(members[f"bin/{applet}"].mode)
        assert members[f"bin/{applet}"].data == b"busybox"
    assert members["lib/modules/load-order"].data == b"virtio_ring\nvirtio\n"
    assert members["lib/modules/virtio.ko"].data == b"virtio"
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    for d in ("proc", "sys", "lower", "rw", "newroot"):
        assert stat.S_ISDIR(members[d].mode)


def test_is_static_elf() -> None:
    exe = Path(sys.executable).resolve().read_bytes()[:65536]
    assert not initramfs.is_static_elf(exe)  # the host Python is dynamically linked
    assert not initramfs.is_static_elf(b"#!/bin/sh\n")
    static = Path("/bin/busybox")
    if static.exists():
        assert initramfs.is_static_elf(static.read_bytes()[:65536])


def test_cpio_writer_is_used_uncompressed() -> None:
    # The kernel unpacks a plain newc archive; the first bytes are the newc magic.
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("x", b"")
    assert buf.getvalue().startswith(b"070701")


# -- tools -------------------------------------------------------------------------------------


def test_missing_tool_says_what_to_install() -> None:
    with pytest.raises(HostError) as err:
        tools.require_tools("mksquashfs", "definitely-not-a-tool-xyz")
    msg = str(err.value)
    assert "apt-get install" in msg and "definitely-not-a-tool-xyz" in msg


def test_failed_command_carries_argv_and_tail() -> None:
    with pytest.raises(ImageBuildError) as err:
        tools.run(
            "demo",
            [
                sys.executable,
                "-c",
                "import sys; print('line1'); print('boom', file=sys.stderr); sys.exit(3)",
            ],
            hint="do something",
        )
    e = err.value
    assert e.step == "demo" and e.argv is not None and e.argv[0] == sys.executable
    assert "boom" in e.output_tail and "exit code 3" in e.output_tail
    assert "do something" in str(e)


def test_absent_program_is_a_host_error() -> None:
    with pytest.raises(HostError):
        tools.run("demo", ["/nonexistent/mksquashfs"])


def test_clean_env_drops_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    env = tools.clean_env()
    assert "SOURCE_DATE_EPOCH" not in env
    assert "/usr/sbin" in env["PATH"].split(":")


# -- build plumbing ----------------------------------------------------------------------------


def test_missing_agent_source_fails_the_rootfs_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from warden.agent import bundle
    from warden.image import build

    def missing() -> dict[str, bytes]:
        raise FileNotFoundError(2, "No such file or directory", "src/warden/agent/guest.py")

    monkeypatch.setattr(bundle, "guest_files", missing)
    with pytest.raises(ImageBuildError) as err:
        build._agent_files()
    assert err.value.step == "rootfs" and "guest.py" in str(err.value)


def test_publish_is_atomic_and_cleans_up(tmp_path: Path) -> None:
    from warden.config import Paths
    from warden.image import build

    paths = Paths(tmp_path)
    paths.cache.mkdir()
    final = paths.cache / "rootfs-0123"

    def failing(out: Path, work: Path) -> None:
        (out / "rootfs.sqfs").write_bytes(b"half")
        (work / "tree").mkdir()
        raise ImageBuildError("rootfs", ["mksquashfs"], "    boom")

    with pytest.raises(ImageBuildError):
        build._publish(paths, final, failing)
    assert list(paths.cache.iterdir()) == [], "a failed build leaves nothing behind"

    def good(out: Path, work: Path) -> None:
        (out / "rootfs.sqfs").write_bytes(b"v1")

    build._publish(paths, final, good)
    assert (final / "rootfs.sqfs").read_bytes() == b"v1"

    def better(out: Path, work: Path) -> None:
        (out / "rootfs.sqfs").write_bytes(b"v2")

    build._publish(paths, final, better)  # --force replaces the old dir
    assert (final / "rootfs.sqfs").read_bytes() == b"v2"
    assert [p.name for p in paths.cache.iterdir()] == ["rootfs-0123"]


# -- PVH kernel ----------------------------------------------------------------------------------


def fake_elf(pvh: bool) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding a Xen note (type 18 = PVH entry)."""
    note_type = kernel.XEN_ELFNOTE_PHYS32_ENTRY if pvh else 6
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\0" + struct.pack("<I", 0x1000000)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)  # PT_NOTE
    struct.pack_into("<Q", phdr, 8, 64 + 56)  # p_offset
    struct.pack_into("<Q", phdr, 32, len(note))  # p_filesz
    return bytes(ehdr + phdr) + note + b"kernel text" * 50


def fake_bzimage(payload: bytes) -> bytes:
    img = bytearray(2 * 512 + 16)
    img[0x1F1] = 1  # setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x020F)
    struct.pack_into("<II", img, 0x248, 16, len(payload))
    return bytes(img) + payload + b"\0" * 64


def test_extract_vmlinux_from_gzip_and_xz_bzimages(tmp_path: Path) -> None:
    elf = fake_elf(pvh=True)
    trailer = struct.pack("<I", len(elf))
    for payload in (gzip.compress(elf) + trailer, lzma.compress(elf) + trailer):
        bz = tmp_path / "vmlinuz"
        bz.write_bytes(fake_bzimage(payload))
        assert kernel.extract_vmlinux(bz, tmp_path) == elf


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_extract_vmlinux_from_lz4_bzimage(tmp_path: Path) -> None:
    elf = fake_elf(pvh=True)
    (tmp_path / "elf").write_bytes(elf)
    subprocess.run(
        ["lz4", "-l", "-q", "-f", str(tmp_path / "elf"), str(tmp_path / "elf.lz4")], check=True
    )
    payload = (tmp_path / "elf.lz4").read_bytes() + struct.pack("<I", len(elf))
    (tmp_path / "vmlinuz").write_bytes(fake_bzimage(payload))
    assert kernel.extract_vmlinux(tmp_path / "vmlinuz", tmp_path) == elf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elf", "elf.lz4", "vmlinuz"]


def test_no_pvh_note_means_boot_the_bzimage(tmp_path: Path) -> None:
    elf = fake_elf(pvh=False)
    assert not kernel.has_pvh_note(elf)
    assert kernel.has_pvh_note(fake_elf(pvh=True))
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(elf) + struct.pack("<I", len(elf))))
    assert kernel.extract_vmlinux(bz, tmp_path) is None
    bz.write_bytes(b"not a kernel" * 100)
    assert kernel.extract_vmlinux(bz, tmp_path) is None


def test_extract_vmlinux_checks_the_size_trailer(tmp_path: Path) -> None:
    elf = fake_elf(pvh=True)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(elf) + struct.pack("<I", len(elf) + 1)))
    with pytest.raises(ImageBuildError):
        kernel.extract_vmlinux(bz, tmp_path)
