"""Boot the built default image in QEMU (microvm, TCG) in each /init mode; store checks.

Uses the image under ``$WARDEN_HOME`` (default /var/lib/warden); build it first with
``warden image build default``. Corruption tests work on copies in tmp dirs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from warden._errors import ImageError, ImageNotFoundError
from warden.config import Paths
from warden.image import store
from warden.image.initramfs import PROBE_MARKER, ROOTCHECK_MARKER
from warden.image.store import Image

pytestmark = pytest.mark.vm

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 30.0


def host_tsc_khz() -> int | None:
    """The host's TSC rate. Under TCG the guest reads the host's TSC."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return int(float(m.group(1)) * 1000) if m else None


def cmdline(mode: str) -> str:
    """The contract's command line (docs/design.md), plus ``tsc_early_khz``.

    Without it the guest kernel calibrates its TSC against the PIT, which under TCG on a busy
    host sometimes fails and the boot hangs before /init (seen in about half the boots while
    other VMs ran on this 2-core machine).
    """
    extra = f" tsc_early_khz={khz}" if (khz := host_tsc_khz()) else ""
    return f"console=ttyS0 quiet panic=-1{extra} warden.mode={mode}"


@pytest.fixture(scope="module")
def image() -> Image:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    try:
        img = store.load_image(Paths.from_env(), "default")
    except ImageNotFoundError as exc:
        pytest.skip(str(exc))
    store.verify_image(img)
    return img


def qemu_argv(
    image: Image, mode: str, console: Path, *, disk: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    assert QEMU is not None
    argv = [
        QEMU,
        "-M",
        "microvm,accel=tcg",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-m",
        "256",
        "-kernel",
        str(image.kernel.path),
        "-initrd",
        str(image.initrd.path),
        "-append",
        cmdline(mode),
        "-serial",
        f"file:{console}",
    ]
    if disk:
        argv += [
            "-drive",
            f"id=root,file={image.rootfs.path},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    return argv + list(extra)


class Boot:
    """One QEMU run: waits for it to exit by itself, and notes when a marker appeared."""

    def __init__(self, argv: list[str], console: Path) -> None:
        self.console = console
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, marker: str | None = None, timeout: float = BOOT_TIMEOUT) -> float | None:
        """Wait for QEMU to exit; return seconds from launch to ``marker`` (None if not seen)."""
        seen: float | None = None
        try:
            while self.proc.poll() is None:
                if marker and seen is None and marker in self.text():
                    seen = time.monotonic() - self.start
                if time.monotonic() - self.start > timeout:
                    pytest.fail(
                        f"QEMU did not exit within {timeout:.0f} s\nconsole:\n{self.text()}"
                    )
                time.sleep(0.01)
        finally:
            self.kill()
        if marker and seen is None and marker in self.text():
            seen = time.monotonic() - self.start
        return seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        out = self.proc.communicate()[0]
        self.qemu_output = out.decode(errors="replace") if out else ""


def test_probe_boots_and_exits(image: Image, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    boot = Boot(qemu_argv(image, "probe", console), console)
    seen = boot.wait(PROBE_MARKER)
    assert seen is not None, f"no {PROBE_MARKER}; console:\n{boot.text()}"
    assert boot.proc.returncode == 0, boot.qemu_output
    assert "warden-init:" not in boot.text()
    print(f"\n{PROBE_MARKER} after {seen:.2f} s")


def test_rootcheck_switch_root(image: Image, tmp_path: Path) -> None:
    """The agent mode's root (squashfs + tmpfs overlay, moved /dev /proc /sys, /tmp 1777),
    checked by Python running as PID 1 after switch_root."""
    console = tmp_path / "console.log"
    boot = Boot(qemu_argv(image, "rootcheck", console), console)
    seen = boot.wait(ROOTCHECK_MARKER)
    assert seen is not None, f"no {ROOTCHECK_MARKER}; console:\n{boot.text()}"
    assert "warden-init:" not in boot.text()
    assert boot.proc.returncode == 0
    print(f"\n{ROOTCHECK_MARKER} after {seen:.2f} s")


def test_qga_mode_answers(image: Image, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    sock = tmp_path / "qga.sock"
    extra = [
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=qga,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
    ]
    boot = Boot(qemu_argv(image, "qga", console, extra=extra), console)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not sock.exists():
            assert time.monotonic() < deadline and boot.proc.poll() is None, boot.text()
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(0.25)
            reply = b""
            while b"\n" not in reply:
                assert time.monotonic() < deadline, f"qemu-ga never answered\n{boot.text()}"
                assert boot.proc.poll() is None, f"QEMU ended\n{boot.text()}"
                s.sendall(b'{"execute":"guest-ping"}\n')
                try:
                    reply += s.recv(4096)
                except TimeoutError:
                    continue
        ready = time.monotonic() - boot.start
        assert json.loads(reply.splitlines()[0]) == {"return": {}}
        assert "warden-init:" not in boot.text()
        print(f"\nqemu-ga answered after {ready:.2f} s")
    finally:
        boot.kill()


def test_unknown_mode_fails_clearly(image: Image, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    boot = Boot(qemu_argv(image, "bogus", console), console)
    boot.wait()
    assert "warden-init: unknown warden.mode=bogus" in boot.text()


def test_missing_rootfs_fails_clearly(image: Image, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    boot = Boot(qemu_argv(image, "agent", console, disk=False), console)
    boot.wait()
    assert "warden-init: no /dev/vda" in boot.text()


# -- store, with the real image --------------------------------------------------------------


def test_load_unknown_image_names_the_build_command() -> None:
    with pytest.raises(ImageNotFoundError) as err:
        store.load_image(Paths.from_env(), "no-such-image")
    assert "warden image build no-such-image" in str(err.value)


def test_verify_detects_a_corrupted_copy(image: Image, tmp_path: Path) -> None:
    paths = Paths(tmp_path / "home")
    try:
        _corrupted_copy(image, paths)
    finally:
        shutil.rmtree(paths.home, ignore_errors=True)  # ~100 MB of copies


def _corrupted_copy(image: Image, paths: Paths) -> None:
    arts = {}
    for kind in store.KINDS:
        src: store.Artifact = getattr(image, kind)
        dest = paths.cache / src.path.parent.name / src.path.name
        dest.parent.mkdir(parents=True)
        shutil.copyfile(src.path, dest)
        arts[kind] = store.Artifact(dest, src.sha256, src.size)
    copy = Image(
        image.name,
        image.recipe_hash,
        image.kernel_version,
        image.built_at,
        arts["kernel"],
        arts["initrd"],
        arts["rootfs"],
    )
    store.write_manifest(paths, copy, [a.path.parent.name for a in arts.values()])
    loaded = store.load_image(paths, image.name)
    assert loaded == copy
    store.verify_image(loaded)  # an intact copy verifies

    with arts["rootfs"].path.open("r+b") as f:  # flip one byte in the middle
        f.seek(arts["rootfs"].size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ImageError) as err:
        store.verify_image(loaded)
    assert str(arts["rootfs"].path) in str(err.value)
    assert "warden image build default --force" in str(err.value)
