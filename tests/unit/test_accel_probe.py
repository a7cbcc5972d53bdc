"""The KVM probe, against a fake QEMU: KVM cannot boot a Linux guest on these hosts (FIELD-NOTES),
so a real probe can only ever say "tcg" here. The fake checks what a real QEMU would refuse
(every -drive file must exist) and then behaves as a guest that reached init, or one that hangs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from warden.vmm import accel
from warden.vmm.argv import BootFiles

FAKE_QEMU = r"""#!/usr/bin/env python3
import re, sys, time
args = sys.argv[1:]
for i, arg in enumerate(args):
    if arg == "-drive":
        path = re.search(r"file=([^,]+)", args[i + 1]).group(1)
        try:
            open(path, "rb").close()
        except OSError as exc:
            sys.exit(f"qemu-system-x86_64: -drive {args[i + 1]}: Could not open '{path}': {exc}")
    if arg == "-chardev" and args[i + 1].startswith("file,"):
        console = re.search(r"path=([^,]+)", args[i + 1]).group(1)
if "{behaviour}" == "hang":
    time.sleep(60)
with open(console, "ab") as f:
    f.write(b"[    1.2] WARDEN-PROBE-OK\n")
"""


def _fake(tmp_path: Path, behaviour: str) -> str:
    qemu = tmp_path / f"qemu-{behaviour}"
    qemu.write_text(FAKE_QEMU.replace("{behaviour}", behaviour))
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    return str(qemu)


def _boot(tmp_path: Path) -> BootFiles:
    files = []
    for name in ("vmlinux", "initrd.img", "rootfs.sqfs"):
        (tmp_path / name).write_bytes(b"x")
        files.append(tmp_path / name)
    return BootFiles(*files)


def test_a_probe_that_reaches_init_chooses_kvm(tmp_path: Path) -> None:
    choice = accel._probe(_boot(tmp_path), _fake(tmp_path, "boots"))
    assert choice.name == "kvm", choice.reason
    assert "reached init" in choice.reason


def test_a_probe_that_hangs_chooses_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "PROBE_DEADLINE_S", 1.0)
    choice = accel._probe(_boot(tmp_path), _fake(tmp_path, "hang"))
    assert choice.name == "tcg"
    assert "did not reach init" in choice.reason


def test_the_probe_leaves_no_files(tmp_path: Path) -> None:
    before = set(os.listdir("/tmp"))
    accel._probe(_boot(tmp_path), _fake(tmp_path, "boots"))
    assert {n for n in set(os.listdir("/tmp")) - before if n.startswith("warden-probe-")} == set()


def test_a_hang_under_pvm_says_the_kvm_is_pvm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our machines' /dev/kvm is PVM's (kvm_pvm), which runs only PVM guest kernels: the
    verdict says so. The module directory is faked: a test host may or may not have it."""
    modules = tmp_path / "sys-module"
    (modules / "kvm").mkdir(parents=True)
    assert accel.kvm_flavour(modules) is None
    (modules / "kvm_pvm").mkdir()
    assert "PVM" in (accel.kvm_flavour(modules) or "")
    monkeypatch.setattr(accel, "PROBE_DEADLINE_S", 1.0)
    monkeypatch.setattr(accel, "kvm_flavour", lambda: "this host's KVM is PVM (module kvm_pvm)")
    choice = accel._probe(_boot(tmp_path), _fake(tmp_path, "hang"))
    assert choice.name == "tcg"
    assert "did not reach init" in choice.reason and "PVM" in choice.reason, choice.reason
