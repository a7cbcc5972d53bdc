"""Boot templates: the first create of a shape boots cold and saves its automatic template,
later creates clone it, clones are not twins of each other, the template is sealed for its
shape, and a changed image or QEMU makes it again (tampering:
tests/security/test_sealed_boot_templates.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warden import Sandbox
from warden._errors import TemplateRefusedError
from warden.config import Paths
from warden.image.store import load_image
from warden.seal import Sealer
from warden.vmm.accel import AccelChoice
from warden.vmm.argv import BootFiles
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import (
    META_FILE,
    SEAL_PURPOSE,
    TemplateConfig,
    Templates,
    boot_template_name,
    check_config,
)

pytestmark = pytest.mark.vm

# A memory size no other test uses, so these tests own their boot template.
MEMORY = 208
NAME = boot_template_name(VMSpec(memory_mib=MEMORY), accel="tcg")  # the tests run under TCG


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def _store() -> Templates:
    return Templates(Paths.from_env())


def _meta() -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((_store().path(NAME) / META_FILE).read_text())
    return meta


@pytest.fixture
def fresh(no_leaks: None) -> Iterator[None]:
    """No boot template of this shape to begin with."""
    if _store().exists(NAME):
        _store().remove(NAME)
    yield


def test_the_first_create_makes_it_and_later_ones_are_clones_that_differ(fresh: None) -> None:
    with Sandbox.create(memory_mib=MEMORY) as first:
        assert (_machine(first).booted_from, _machine(first).boot_template) == ("cold", NAME)
        assert first.commands.run("echo first").stdout == "first\n"  # it goes on after saving
    assert _store().exists(NAME), "no boot template was saved"
    with Sandbox.create(memory_mib=MEMORY) as a, Sandbox.create(memory_mib=MEMORY) as b:
        seen = []
        for sbx in (a, b):
            machine = _machine(sbx)
            assert (machine.booted_from, machine.boot_template) == ("template", NAME)
            r = sbx.commands.run("head -c 16 /dev/urandom | od -An -tx1; hostname; date +%s")
            rand, host, clock = r.stdout.strip().rsplit("\n", 2)
            # The guest clock was set from the host at HELLO, not left at capture time.
            assert abs(int(clock) - time.time()) < 30
            sbx.files.write("/home/user/f", f"written by {sbx.id}")
            seen.append((sbx.id, rand, host, machine.channel_keys.current(sbx.id)))
        assert a.files.read("/home/user/f") == f"written by {a.id}"  # b's write stayed in b
        template_secret = _store().keys.template(NAME)
        for i, what in enumerate(("id", "RNG output", "hostname", "channel secret")):
            assert seen[0][i] != seen[1][i], f"two clones have the same {what}"
        assert template_secret not in (seen[0][3], seen[1][3]), "a clone kept the template's key"


def test_it_is_sealed_for_its_shape_and_listed_only_with_all(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        image = _machine(sbx).image
    assert image is not None
    meta = _meta()
    assert meta["seal"]["alg"] == "HMAC-SHA256" and len(meta["seal"]["tag"]) == 64
    assert (meta["image"], meta["memory_mib"], meta["vcpus"], meta["automatic"]) == (
        "default",
        MEMORY,
        1,
        True,
    )
    assert meta["qemu_version"].startswith("QEMU emulator version")
    assert (meta["kernel_sha256"], meta["initrd_sha256"], meta["rootfs_sha256"]) == (
        image.kernel.sha256,
        image.initrd.sha256,
        image.rootfs.sha256,
    )
    assert NAME not in _store().names()
    [info] = [t for t in _store().list(automatic=True) if t.name == NAME]
    assert info.automatic and info.problem is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rootfs_sha256": "0" * 64}, "the image's rootfs changed (rebuilt)"),
        ({"kernel_sha256": "0" * 64}, "the image's kernel changed (rebuilt)"),
        ({"qemu_version": "QEMU emulator version 6.2.0"}, "QEMU is QEMU emulator version"),
    ],
)
def test_a_changed_image_or_qemu_makes_it_again(
    no_leaks: None, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str
) -> None:
    """The template says it was made for another image or QEMU (sealed with the host key, as
    an image rebuild or a QEMU upgrade leaves it): the next create boots cold, and makes it
    again for what is there now; the one after clones that."""
    with Sandbox.create(memory_mib=MEMORY):
        pass
    sealer = Sealer(Paths.from_env(), SEAL_PURPOSE)
    (_store().path(NAME) / META_FILE).write_text(json.dumps(sealer.seal({**_meta(), **change})))
    with caplog.at_level(logging.WARNING), Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "cold"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    assert reason in caplog.text and "making it again" in caplog.text
    for field, value in change.items():
        assert _meta()[field] != value, f"the template was not made again ({field})"
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"


def _unlaunched(accel: str) -> tuple[Machine, BootFiles]:
    """A Machine of this shape whose accelerator is set, never launched: the fake stands for
    KVM, which cannot boot a guest on this host (docs, FIELD-NOTES); what the choice changes
    (the boot template's name, the machine its seal binds) needs no running VM."""
    machine = Machine(VMSpec(memory_mib=MEMORY))
    machine.image = image = load_image(machine.paths, "default")
    machine.accel = AccelChoice("kvm" if accel == "kvm" else "tcg", "set by the test")
    return machine, BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path)


def _config(accel: str) -> TemplateConfig:
    machine, boot = _unlaunched(accel)
    return machine._template_config(boot)


def test_the_accelerator_is_in_its_name_and_its_seal(no_leaks: None) -> None:
    """One made under TCG is never loaded under KVM, nor the other way round: the names
    differ, and the sealed machine (QEMU's argv: -accel, -cpu) would refuse it anyway."""
    with Sandbox.create(memory_mib=MEMORY):  # a real VM under TCG makes NAME
        pass
    kvm, boot = _unlaunched("kvm")
    assert boot_template_name(kvm.spec, accel="kvm") != NAME
    assert kvm._load_boot_template(boot) is None  # none under KVM's name: it would boot cold
    assert kvm.boot_template != NAME and _store().exists(NAME), "TCG's template was touched"
    tcg, kvm_config = _config("tcg"), _config("kvm")
    assert _meta()["machine_key"] == tcg.machine_key != kvm_config.machine_key
    loaded = _store().load(NAME)
    loaded.state.close()
    with pytest.raises(TemplateRefusedError, match="another machine"):
        check_config(NAME, loaded.config, kvm_config)  # TCG's, wanted by KVM
    with pytest.raises(TemplateRefusedError, match="another machine"):
        check_config(NAME, kvm_config, tcg)  # KVM's, wanted by TCG


def test_one_sealed_for_kvm_is_made_again_under_tcg(
    no_leaks: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A boot template under this name sealed for KVM's machine (as an older warden, whose
    names had no accelerator, could leave it): refused, the create boots cold and makes it
    again for TCG; the next create clones that."""
    with Sandbox.create(memory_mib=MEMORY):
        pass
    sealer = Sealer(Paths.from_env(), SEAL_PURPOSE)
    kvm_key = _config("kvm").machine_key
    meta = {**_meta(), "machine_key": kvm_key}
    (_store().path(NAME) / META_FILE).write_text(json.dumps(sealer.seal(meta)))
    with caplog.at_level(logging.WARNING), Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "cold"
    assert "another machine" in caplog.text and "making it again" in caplog.text
    assert _meta()["machine_key"] == _config("tcg").machine_key != kvm_key
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"


def test_cold_boot_on_request_neither_uses_nor_makes_it(fresh: None) -> None:
    with Sandbox.create(memory_mib=MEMORY, boot="cold") as sbx:
        assert (_machine(sbx).booted_from, _machine(sbx).boot_template) == ("cold", None)
        assert sbx.commands.run(["true"]).exit_code == 0
    assert not _store().exists(NAME)


def _private_mib(pid: int) -> float:
    """The private (anonymous) part of a QEMU's PSS: what it does not share with others."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Pss_Anon in smaps_rollup")


def test_a_template_saved_from_a_default_vm_shares_its_ram(no_leaks: None) -> None:
    """A default VM is a clone (of its boot template), whose RAM QEMU would migrate with the
    device state: saved without any RAM (snapshot.save_device_state) and its RAM copied, its
    template's clones map that RAM copy-on-write instead of loading it into memory of their own
    (private PSS 125 MiB when the state carried the RAM, against a plain clone's 48 here)."""
    name = f"from-default-{os.getpid()}"
    if not _store().exists(NAME):
        with Sandbox.create(memory_mib=MEMORY):  # makes the boot template
            pass
    with Sandbox.create(memory_mib=MEMORY) as plain:
        assert _machine(plain).booted_from == "template"
        plain.files.write("/home/user/mark", "saved")
        plain.save_template(name)
        assert plain.commands.run("cat /home/user/mark").stdout == "saved"  # it goes on
        try:
            with Sandbox.create(template=name) as clone:
                assert clone.files.read("/home/user/mark") == "saved"
                assert clone.commands.run("hostname").stdout.strip() == clone.id
                time.sleep(3)
                derived, baseline = (_private_mib(_machine(s).pid or 0) for s in (clone, plain))
        finally:
            _store().remove(name)
    assert derived < baseline + 30, (derived, baseline)


def test_two_first_creates_at_once_make_one_template(fresh: None) -> None:
    """Both boot cold and try to save it: one wins, the other goes on without an error, and
    the template and its key are the winner's (the next create clones it)."""

    async def both() -> list[str | None]:
        machines = [Machine(VMSpec(memory_mib=MEMORY)) for _ in range(2)]
        try:
            await asyncio.gather(*(m.launch() for m in machines))
            for m in machines:
                assert (await m.agent.exec(["echo", "ok"])).stdout == b"ok\n"
            return [m.booted_from for m in machines]
        finally:
            await asyncio.gather(*(m.shutdown() for m in machines))

    assert asyncio.run(both()) == ["cold", "cold"]
    assert _store().exists(NAME) and _store().keys.template(NAME) is not None
    assert not list(_store().root.glob(f".{NAME}.*.tmp")), "a work dir was left"
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
