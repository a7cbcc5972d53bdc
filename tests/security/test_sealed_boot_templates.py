"""Sealed boot templates, against real VMs: a tampered or mismatched automatic template never
runs; it is deleted and made again.

Issue 7 found that a byte changed in a boot snapshot's guest memory ran in the restored VM
without a warning. Boot snapshots are now automatic templates (``vmm/templates.py``): here the
template of one shape (a memory size no other test uses) is tampered with on disk, as someone
who can write the template store but does not hold the host key would:

* one byte in the guest memory: the first letter of the agent's name, ``warden-agent/...``,
  which the agent sends in every HELLO. A control run with the tampered RAM re-sealed by the
  host key (as only root could: the check then passes) shows that the flip is live: the
  clone's agent says ``Warden-agent/...``. Unsealed, the VM boots cold and says
  ``warden-agent/...``: the tampered memory never ran;
* one byte in the device state;
* metadata that claims another shape, sealed with the host key, and a template sealed with
  another host key.

Each is refused with a logged reason, the VM comes up by a cold boot, the tampered files are
gone, and a fresh sealed template replaces them (the next VM clones it). A *user's* template
tampered with in the same ways is refused with TemplateRefusedError and kept
(tests/security/test_template_seal.py): only an automatic one is silently made again.

This process keeps each verified template's RAM in a sealed memfd (the kernel refuses writes
to it), so a change on disk can only reach a process that loads it anew: each test drops that
cache first, as a new process starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warden import Sandbox
from warden.config import Paths
from warden.guest.info import AGENT_NAME
from warden.seal import Sealer
from warden.vmm import memfd, templates
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import (
    META_FILE,
    RAM_FILE,
    SEAL_PURPOSE,
    STATE_FILE,
    Templates,
    boot_template_name,
)

pytestmark = pytest.mark.vm

MEMORY = 216
"""A memory size no other test uses: these tests own the boot template of this shape."""
NAME = boot_template_name(VMSpec(memory_mib=MEMORY), accel="tcg")  # the tests run under TCG
MACHINE_LOG = "warden.vmm.machine"
MARKER = AGENT_NAME.encode()
TAMPERED_MARKER = bytes([MARKER[0] ^ 0x20]) + MARKER[1:]  # "Warden-agent/..."
CPU_SECTION = re.compile(rb"\x04.{4}\x03cpu\x00\x00\x00\x00", re.DOTALL)
"""A full device section of QEMU's migration stream: type 4, section id, name, instance 0."""


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def _hello_agent(sbx: Sandbox) -> str:
    """The agent's name as it said it in this session's HELLO."""
    return str(_machine(sbx).agent.agent_hello["agent"])


def _load_anew(directory: Path) -> None:
    """Forget this process's verified copy of the template's RAM (as a new process has none)."""
    templates._forget_ram(directory)


@pytest.fixture
def template(no_leaks: None) -> Iterator[Path]:
    """The dir of this shape's sealed boot template (made if there is none)."""
    with Sandbox.create(memory_mib=MEMORY):
        pass
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"
        assert _hello_agent(sbx) == AGENT_NAME
    directory = Templates(Paths.from_env()).path(NAME)
    _load_anew(directory)
    yield directory


def _flip(path: Path, offsets: list[int]) -> None:
    """Flip bit 5 of the bytes at ``offsets`` in place (same file, same size, holes kept)."""
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in offsets:
            byte = os.pread(fd, 1, offset)[0]
            os.pwrite(fd, bytes([byte ^ 0x20]), offset)
    finally:
        os.close(fd)


def _assert_refused_and_made_again(
    directory: Path, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    """A VM of this shape boots cold (its agent unchanged), the tampered files are gone and a
    fresh sealed template is cloned by the next VM."""
    before = {f: (directory / f).read_bytes() for f in (STATE_FILE, META_FILE)}
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger=MACHINE_LOG),
        Sandbox.create(memory_mib=MEMORY) as sbx,
    ):
        assert _machine(sbx).booted_from == "cold"
        assert _hello_agent(sbx) == AGENT_NAME
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    refusals = [r.getMessage() for r in caplog.records if "is refused" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0], refusals
    assert "making it again" in refusals[0]
    assert (directory / META_FILE).read_bytes() != before[META_FILE], "not made again"
    assert TAMPERED_MARKER not in (directory / RAM_FILE).read_bytes()
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template", "no fresh sealed template was saved"
        assert _hello_agent(sbx) == AGENT_NAME


def _reseal(directory: Path, sealer: Sealer, change: dict[str, Any]) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    (directory / META_FILE).write_text(json.dumps(sealer.seal({**meta, **change})))


def test_a_flipped_byte_in_guest_memory_never_runs(
    template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ram = template / RAM_FILE
    found = [m.start() for m in re.finditer(re.escape(MARKER), ram.read_bytes())]
    assert found, f"{AGENT_NAME!r} is not in the template's guest memory"
    _flip(ram, found)  # one byte per copy of the agent's name
    sealed_meta = (template / META_FILE).read_bytes()

    # Control: sealed with the host key for the tampered RAM (as only root could), the flipped
    # byte is what the clone's agent runs with. This is what an unchecked load would give.
    fd = os.open(ram, os.O_RDONLY)
    try:
        copy, digest = memfd.sealed_copy(fd, MEMORY << 20, "test-digest")
        os.close(copy)
    finally:
        os.close(fd)
    _reseal(template, Sealer(Paths.from_env(), SEAL_PURPOSE), {"memory_digest": digest})
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"
        assert _hello_agent(sbx) == TAMPERED_MARKER.decode()

    # The real seal, the tampered RAM: refused before any QEMU maps it.
    (template / META_FILE).write_bytes(sealed_meta)
    _load_anew(template)
    _assert_refused_and_made_again(template, caplog, f"the digest of {RAM_FILE}")


def test_a_flipped_byte_in_the_device_state_is_refused(
    template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = template / STATE_FILE
    cpu = CPU_SECTION.search(state.read_bytes())
    assert cpu is not None
    _flip(state, [cpu.end() + 4 + 8])  # past the version: inside the vCPU's registers
    _assert_refused_and_made_again(template, caplog, f"the SHA-256 of {STATE_FILE}")


def test_metadata_that_claims_another_shape_is_refused(
    template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sealed with the host key (as only root could), but not for this machine."""
    _reseal(template, Sealer(Paths.from_env(), SEAL_PURPOSE), {"memory_mib": 512})
    _assert_refused_and_made_again(template, caplog, f"its memory_mib is 512, the clone's {MEMORY}")


def test_a_template_sealed_with_another_key_is_refused(
    template: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A genuine template of this shape, sealed with another host's key."""
    _reseal(template, Sealer(Paths(tmp_path / "other-host"), SEAL_PURPOSE), {})
    assert (tmp_path / "other-host" / "keys" / "seal.key").exists()
    _assert_refused_and_made_again(template, caplog, "sealed with another host key")
