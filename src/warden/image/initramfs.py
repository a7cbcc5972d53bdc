"""The initramfs: static busybox, the kernel modules and ``/init``, as an uncompressed newc cpio.

``/init`` implements the guest boot contract of docs/design.md. It is a constant script: the
modules to load (already in dependency order) are read from ``/lib/modules/load-order``, so the
script's text alone feeds the initrd hash.

Modes (kernel command line ``warden.mode=``):

``agent`` (default)
    overlay root (squashfs ``/dev/vda`` + tmpfs), then ``switch_root`` to the Python agent.
``qga``
    the same root, then ``switch_root`` to Debian's ``qemu-ga`` on the port named
    ``org.qemu.guest_agent.0``.
``probe``
    print ``WARDEN-PROBE-OK`` and power off (the accelerator probe).
``rootcheck``
    a debug mode: the same root, then Python (as PID 1) checks it, prints ``WARDEN-ROOT-OK``
    and powers off. Proves the switch_root path without the agent.

On any failure ``/init`` prints one ``warden-init: <what failed>`` line and ends the VM.

``/init`` ends the VM by powering off (``poweroff -f``: ACPI S5 through microvm's GED), not by
rebooting. Measured on QEMU 7.2 microvm under TCG: the kernel's default reboot path (ACPI reset,
keyboard controller, then a real-mode restart) sometimes runs astray in the guest instead of
reaching the triple fault that ``-no-reboot`` turns into an exit; QEMU then spins forever (or
boots again). Power-off ended QEMU every time. If ``poweroff`` itself fails, ``exit 1`` makes
the kernel panic, and ``panic=-1`` reboots.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from warden._errors import HostError
from warden.agent.bundle import AGENT_MAIN
from warden.image.cpio import CpioWriter
from warden.image.tools import install_hint

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
APPLETS = (
    "cat",
    "echo",
    "insmod",
    "ls",
    "mkdir",
    "mount",
    "poweroff",
    "reboot",
    "sh",
    "sleep",
    "switch_root",
    "umount",
)
"""Applets linked in /bin. The shell runs applets without them (busybox's standalone shell),
but they make the initramfs usable by hand."""

MODULE_DIR = "lib/modules"
LOAD_ORDER_FILE = f"{MODULE_DIR}/load-order"
PROBE_MARKER = "WARDEN-PROBE-OK"
ROOTCHECK_MARKER = "WARDEN-ROOT-OK"
AGENT_PORT_QGA = "org.qemu.guest_agent.0"

# Python run as PID 1 by warden.mode=rootcheck. Single-quoted in the shell script below, so it
# must not contain a single quote. It ends the VM with reboot(2) RB_POWER_OFF when done.
_ROOTCHECK_PY = (
    "import ctypes,os,stat\n"
    "bad=[]\n"
    'os.getpid()==1 or bad.append("pid")\n'
    'stat.S_IMODE(os.stat("/tmp").st_mode)==0o1777 or bad.append("/tmp mode")\n'
    '[bad.append(d+" not mounted") for d in ("/dev","/proc","/sys") '
    "if not os.path.ismount(d)]\n"
    'os.path.isdir("/root") or bad.append("/root")\n'
    f'os.path.isfile("{AGENT_MAIN}") or bad.append("agent missing")\n'
    "try:\n"
    ' open("/root/.rootcheck","w").close()\n'
    "except OSError as e:\n"
    ' bad.append("root not writable: %s"%e)\n'
    f'print("warden-init: rootcheck failed: "+", ".join(bad) if bad else "{ROOTCHECK_MARKER}"'
    ",flush=True)\n"
    "ctypes.CDLL(None).reboot(0x4321FEDC)\n"
)

RW_RESERVE_KB = 64 * 1024
"""What a full writable layer must leave of the guest's RAM (MemTotal): the kernel, the agent
(25 MB with its crypto) and a working page cache. With the layer at half of a 128 MiB guest's
RAM, a ``dd`` that filled it made the guest thrash (its vCPU at 100%) and its agent stop
answering."""
RW_MIN_KB = 16 * 1024
"""The writable layer is never smaller than this."""

INIT_SCRIPT = f"""#!/bin/sh
# warden-init: PID 1 of the initramfs. The guest boot contract is in docs/design.md.
export PATH=/bin
fail() {{
    echo "warden-init: $*"
    poweroff -f
    exit 1
}}

mount -t devtmpfs -o nosuid devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
while read -r m; do
    insmod "/{MODULE_DIR}/$m.ko" || fail "cannot load kernel module $m"
done < /{LOAD_ORDER_FILE}

mode=agent
read -r cmdline < /proc/cmdline
set -f
for arg in $cmdline; do
    case "$arg" in warden.mode=*) mode="${{arg#warden.mode=}}" ;; esac
done
set +f
case "$mode" in
    probe) echo {PROBE_MARKER}; poweroff -f; exit 1 ;;
    agent|qga|rootcheck) ;;
    *) fail "unknown warden.mode=$mode (expected agent, qga, probe or rootcheck)" ;;
esac

n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ $n -gt 200 ] && fail "no /dev/vda: the rootfs disk is missing"
    sleep 0.01
done
mount -t squashfs -o ro /dev/vda /lower || fail "cannot mount the rootfs /dev/vda (squashfs)"
# The writable layer: half the RAM, but never so much that a full one leaves the kernel, the
# agent and the page cache less than RW_RESERVE_KB (a full 50% thrashed a 128 MiB guest).
total=""
while read -r key value unit; do
    [ "$key" = "MemTotal:" ] && total=$value
done < /proc/meminfo
[ -n "$total" ] || fail "cannot read MemTotal from /proc/meminfo"
rw=$((total / 2))
[ $((total - {RW_RESERVE_KB})) -lt $rw ] && rw=$((total - {RW_RESERVE_KB}))
[ $rw -lt {RW_MIN_KB} ] && rw={RW_MIN_KB}
mount -t tmpfs -o mode=0755,size=${{rw}}k tmpfs /rw || fail "cannot mount the tmpfs for the overlay"
mkdir /rw/upper /rw/work || fail "cannot make the overlay dirs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || fail "cannot mount the overlay root"
for d in dev proc sys; do
    [ -d /newroot/$d ] || mkdir /newroot/$d || fail "cannot make /$d in the new root"
    mount -o move /$d /newroot/$d || fail "cannot move /$d into the new root"
done
[ -d /newroot/tmp ] || mkdir -m 1777 /newroot/tmp || fail "cannot make /tmp in the new root"
[ -d /newroot/root ] || mkdir -m 0700 /newroot/root || fail "cannot make /root in the new root"
[ -x /newroot/usr/bin/python3 ] || [ "$mode" = qga ] || fail "the rootfs has no /usr/bin/python3"

case "$mode" in
agent)
    [ -f /newroot{AGENT_MAIN} ] || fail "the rootfs has no {AGENT_MAIN}"
    exec switch_root /newroot /usr/bin/python3 -E -s -S {AGENT_MAIN}
    ;;
qga)
    [ -x /newroot/usr/sbin/qemu-ga ] || fail "the rootfs has no /usr/sbin/qemu-ga"
    port=
    n=0
    while [ -z "$port" ]; do
        for p in /newroot/sys/class/virtio-ports/*; do
            [ -r "$p/name" ] || continue
            read -r name < "$p/name"
            [ "$name" = {AGENT_PORT_QGA} ] && port="${{p##*/}}"
        done
        [ -n "$port" ] && break
        n=$((n + 1))
        [ $n -gt 300 ] && fail "no virtio port named {AGENT_PORT_QGA}"
        sleep 0.01
    done
    exec switch_root /newroot /usr/sbin/qemu-ga --method=virtio-serial --path="/dev/$port"
    ;;
rootcheck)
    exec switch_root /newroot /usr/bin/python3 -E -s -S -c '{_ROOTCHECK_PY}'
    ;;
esac
fail "switch_root failed"
"""


def find_busybox() -> Path:
    """The host's static busybox, or HostError saying how to install it."""
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file():
            if not is_static_elf(candidate.read_bytes()[:65536]):
                raise HostError(
                    f"{candidate} is dynamically linked; the initramfs needs the static one: "
                    f"{install_hint(['busybox-static'])}"
                )
            return candidate
    raise HostError(f"busybox is not installed; install with: {install_hint(['busybox-static'])}")


def is_static_elf(head: bytes) -> bool:
    """True if these first bytes of an ELF64 file show no program interpreter (PT_INTERP)."""
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    endian = "<" if head[5] == 1 else ">"
    phoff = struct.unpack_from(endian + "Q", head, 0x20)[0]
    phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            return False
        if struct.unpack_from(endian + "I", head, off)[0] == 3:  # PT_INTERP
            return False
    return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_initramfs(out: BinaryIO, *, busybox: Path, modules: Sequence[tuple[str, bytes]]) -> int:
    """Write the initramfs to ``out``: ``modules`` are (name, ELF bytes) in load order.

    Returns the archive size.
    """
    with CpioWriter(out) as cpio:
        for d in ("dev", "proc", "sys", "lower", "rw", "newroot", "bin", MODULE_DIR):
            cpio.add_dir(d)
        # The kernel opens /dev/console of the initramfs as PID 1's stdin/stdout/stderr.
        cpio.add_device("dev/console", "c", 5, 1, 0o600)
        cpio.add_file("init", INIT_SCRIPT.encode(), mode=0o755)
        cpio.add_file("bin/busybox", source=busybox, mode=0o755)
        for applet in APPLETS:
            cpio.add_symlink(f"bin/{applet}", "busybox")
        for name, data in modules:
            cpio.add_file(f"{MODULE_DIR}/{name}.ko", data, mode=0o644)
        order = "".join(f"{name}\n" for name, _ in modules)
        cpio.add_file(LOAD_ORDER_FILE, order.encode(), mode=0o644)
        return cpio.trailer()
