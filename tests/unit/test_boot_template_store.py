"""Automatic boot templates in the template store: their names, the machine key that a clone
must match, hiding from the list, their channel secrets. (Real VMs, tampering and re-making:
tests/integration/test_boot_template.py and tests/security/test_sealed_boot_templates.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from warden._errors import SpecError
from warden.config import Paths
from warden.seal import KeyStore, digests
from warden.vmm import memfd, templates
from warden.vmm.argv import BootFiles, RuntimeFiles, build_argv
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.snapshot import machine_key, remove_boot_snapshots
from warden.vmm.spec import VMSpec
from warden.vmm.templates import (
    META_FILE,
    Templates,
    boot_template_name,
    check_name,
    is_automatic,
)

BOOT = BootFiles(Path("/img/vmlinux"), Path("/img/initrd.img"), Path("/img/rootfs.sqfs"))


def _key(spec: VMSpec, vm_id: str, qemu: str = "QEMU 7.2") -> str:
    run = RuntimeFiles(Path("/var/lib/warden/run/vms") / vm_id)
    return machine_key(build_argv(spec, BOOT, run, accel="tcg"), vm_id, run.dir, qemu)


def test_the_machine_key_ignores_per_vm_names_only() -> None:
    assert _key(VMSpec(), "aaaaaaaaaaaa") == _key(VMSpec(), "bbbbbbbbbbbb")
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(memory_mib=512), "a" * 12)
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(vcpus=2), "a" * 12)
    assert _key(VMSpec(), "a" * 12) != _key(VMSpec(), "a" * 12, qemu="QEMU 8.0")
    # env and labels are not machine state: they don't split templates.
    assert _key(VMSpec(), "a" * 12) == _key(VMSpec(env={"A": "1"}, labels={"x": "y"}), "a" * 12)


def test_one_automatic_template_per_shape_and_accelerator() -> None:
    assert boot_template_name(VMSpec(), accel="tcg") == "_boot-default-256m-1c-tcg"
    assert boot_template_name(VMSpec(image="py3.12", memory_mib=512, vcpus=2), accel="kvm") == (
        "_boot-py3.12-512m-2c-kvm"
    )
    # What does not change the machine does not change the name.
    assert boot_template_name(VMSpec(env={"A": "1"}, labels={"x": "y"}, name="n"), accel="tcg") == (
        boot_template_name(VMSpec(), accel="tcg")
    )
    # A template made under TCG is never looked up under KVM, nor the other way round.
    assert boot_template_name(VMSpec(), accel="tcg") != boot_template_name(VMSpec(), accel="kvm")
    for name in ("_boot-default-256m-1c-tcg", "_boot-default-256m-1c-kvm"):
        assert is_automatic(name)
    assert is_automatic("_boot-default-256m-1c-tcg")  # an older warden's: listed, pruned
    assert not is_automatic("boot-default-256m-1c") and not is_automatic("_boot-d-1m-1c-xen")


@pytest.mark.parametrize(
    "name", ["_boot-default-256m-1c-tcg", "_boot-default-256m-1c", "_x", "_boot-../x-1m-1c"]
)
def test_a_user_cannot_name_a_template_like_an_automatic_one(name: str) -> None:
    with pytest.raises(SpecError, match="is not valid"):
        check_name(name)
    with pytest.raises(SpecError):
        VMSpec(template=name)


def test_automatic_templates_are_listed_only_when_asked(tmp_path: Path) -> None:
    store = Templates(Paths(tmp_path))
    for name in ("mine", "_boot-default-256m-1c-tcg"):
        store.path(name).mkdir(parents=True)
        # Not sealed by this host: listed, with the reason a clone of it would be refused.
        (store.path(name) / META_FILE).write_text('{"seal": {"alg": "HMAC-SHA256", "tag": ""}}')
    (store.root / ".mine.123.tmp").mkdir()  # one being written: never listed
    assert store.names() == ["mine"]
    assert store.names(automatic=True) == ["_boot-default-256m-1c-tcg", "mine"]
    assert [t.name for t in store.list()] == ["mine"]
    listed = {t.name: t for t in store.list(automatic=True)}
    assert listed["_boot-default-256m-1c-tcg"].automatic and not listed["mine"].automatic
    assert listed["mine"].problem is not None  # not sealed: a clone of it would be refused
    store.remove("_boot-default-256m-1c-tcg")
    assert store.names(automatic=True) == ["mine"]


def test_an_automatic_templates_secret_has_a_key_name_of_its_own(tmp_path: Path) -> None:
    """'_' and '.' are no key-store names: an automatic template's secret is kept under a hash
    of its name, in a namespace no user template's can reach."""
    paths = Paths(tmp_path)
    keys = ChannelKeys(paths)
    auto, user = "_boot-py3.12-256m-1c-tcg", "boot-py3-12-256m-1c"
    keys.save_template(auto, bytes(range(32)))
    keys.save_template(user, bytes(32))
    assert keys.template(auto) == bytes(range(32)) and keys.template(user) == bytes(32)
    names = sorted(p.relative_to(KeyStore(paths).root).as_posix() for p in _key_files(paths))
    assert names[0].startswith("boot-template/") and names[1] == f"template/{user}.key"
    keys.forget_template(auto)
    assert keys.template(auto) is None and keys.template(user) == bytes(32)


def _key_files(paths: Paths) -> list[Path]:
    root = KeyStore(paths).root
    return [p for p in root.rglob("*.key") if p.parent != root]  # not the host's seal.key


def test_the_cli_lists_automatic_templates_with_all_only(tmp_path: Path) -> None:
    """`warden template list` (embedded: no daemon socket in this home) hides them."""
    store = Templates(Paths(tmp_path))
    for name in ("mine", "_boot-default-256m-1c-tcg"):
        store.path(name).mkdir(parents=True)
        (store.path(name) / META_FILE).write_text('{"seal": {"alg": "HMAC-SHA256", "tag": ""}}')
    env = {**os.environ, "WARDEN_HOME": str(tmp_path), "WARDEN_HOST": "", "COLUMNS": "200"}
    argv = [sys.executable, "-c", "from warden.cli.main import main; main()", "template", "list"]
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    everything = subprocess.run(
        [*argv, "--all"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "mine" in plain and "_boot-default" not in plain
    assert "mine" in everything and "_boot-default-256m-1c-tcg" in everything
    assert "automatic" in everything


def test_what_boot_snapshots_left_is_removed(tmp_path: Path) -> None:
    (tmp_path / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "snapshots" / "abc" / "state.bin").write_bytes(b"x")
    (tmp_path / "keys" / "snapshot").mkdir(parents=True)
    (tmp_path / "keys" / "snapshot" / "abc.key").write_bytes(bytes(32))
    (tmp_path / "keys" / "template").mkdir()
    remove_boot_snapshots(tmp_path)
    assert not (tmp_path / "snapshots").exists()
    assert not (tmp_path / "keys" / "snapshot").exists()
    assert (tmp_path / "keys" / "template").is_dir()
    remove_boot_snapshots(tmp_path)  # nothing left: nothing to do


def test_a_remembered_ram_digest_spares_the_hash_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every new process copies a template's RAM into a sealed memfd; its digest is computed
    on that copy, unless remembered for the file's unchanged stat (seal/digests.py)."""
    monkeypatch.setattr(templates, "RACY_NS", 0)
    monkeypatch.setattr(digests, "_memo", {})
    store = Templates(Paths(tmp_path / "home"))
    ram = tmp_path / "memory.ram"
    ram.write_bytes(b"\1" * (3 << 20) + bytes(1 << 20))
    size = ram.stat().st_size
    hashed: list[int] = []
    real = memfd.ram_digest

    def counting(fd: int, n: int) -> str:
        hashed.append(fd)
        return real(fd, n)

    monkeypatch.setattr(memfd, "ram_digest", counting)

    def load(meta: dict[str, Any]) -> str:
        fd = os.open(ram, os.O_RDONLY)
        copy = os.memfd_create("test-copy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(copy, size)
            digest = store._copy_ram(ram, fd, size, meta, copy)
            assert memfd.is_sealed(copy)
            assert os.pread(copy, 8, 0) == ram.read_bytes()[:8]
            return digest
        finally:
            os.close(copy)
            os.close(fd)

    sealed = load({})  # a first look: hashed (and not remembered: no sealed digest matched)
    meta = {"memory_digest": sealed}
    assert load(meta) == sealed and load(meta) == sealed
    assert len(hashed) == 2, "the second load should have been remembered"
    with open(ram, "r+b") as f:  # one byte changed: a new ctime, hashed again
        f.write(b"\2")
    assert load(meta) != sealed and len(hashed) == 3


def test_automatic_templates_are_pruned_least_recently_used_first(tmp_path: Path) -> None:
    """Each shape of VM makes a boot template (~110 MiB of disk): past the limit, the least
    recently used go when a new one is saved; user templates and the new one never do."""
    store = Templates(Paths(home=tmp_path))
    names = [boot_template_name(VMSpec(memory_mib=m), accel="tcg") for m in (128, 160, 192, 224)]
    for age, name in enumerate(names):
        directory = store.path(name)
        directory.mkdir(parents=True)
        (directory / META_FILE).write_text("{}")
        os.utime(directory, (1000.0 + age, 1000.0 + age))
    user = store.path("mine")
    user.mkdir()
    (user / META_FILE).write_text("{}")
    os.utime(store.path(names[0]), (5000.0, 5000.0))  # the oldest was used last
    assert store.prune_automatic(keep=names[3], limit=3) == [names[1]]  # 3 kept, new included
    assert sorted(store.names(automatic=True)) == sorted([names[0], names[2], names[3], "mine"])
    assert store.prune_automatic(keep=names[3], limit=3) == []
