"""Sealed boot snapshots, against real VMs: a tampered or mismatched snapshot never runs.

Issue 7 found that a byte changed in ``state.bin``'s guest memory ran in the restored VM
without a warning. Here the boot snapshot of one configuration (a memory size no other test
uses) is tampered with on disk, as someone who can write the snapshot dir but does not hold
the host key would:

* one byte in the device state (the ``cpu`` section, after the RAM pages of the stream);
* one byte in the guest memory: the first letter of the agent's name, ``warden-agent/...``,
  which the agent sends in every HELLO. A control run that skips the check (and only it)
  shows that the flip is live: the restored agent then says ``Warden-agent/...``. With the
  check, the VM boots cold and says ``warden-agent/...``: the tampered memory never ran;
* metadata that claims another configuration, sealed with the host key, and a snapshot sealed
  with another host key.

Each is refused with a logged reason, the VM comes up by a cold boot, the tampered file is
gone, and a fresh sealed snapshot replaces it (the next VM is restored from that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warden import Sandbox
from warden.config import Paths
from warden.guest.info import AGENT_NAME
from warden.seal import Sealer, digests
from warden.vmm.machine import Machine
from warden.vmm.snapshot import META_FILE, SEAL_PURPOSE, STATE_FILE, BootSnapshots

pytestmark = pytest.mark.vm

MEMORY = 216
"""A memory size no other test uses: these tests own the snapshot of this configuration."""
SNAPSHOT_LOG = "warden.vmm.snapshot"
MARKER = AGENT_NAME.encode()
TAMPERED_MARKER = bytes([MARKER[0] ^ 0x20]) + MARKER[1:]  # "Warden-agent/..."
CPU_SECTION = re.compile(rb"\x04.{4}\x03cpu\x00\x00\x00\x00", re.DOTALL)
"""A full device section of QEMU's migration stream: type 4, section id, name, instance 0."""
TIMER_SECTION = re.compile(rb"\x04.{4}\x05timer\x00\x00\x00\x00", re.DOTALL)
"""The first device section: the RAM pages end where it starts."""


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def _hello_agent(sbx: Sandbox) -> str:
    """The agent's name as it said it in this session's HELLO."""
    return str(_machine(sbx).agent.agent_hello["agent"])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def snapshot(no_leaks: None) -> Iterator[Path]:
    """The dir of this configuration's sealed snapshot, verified once and remembered (so the
    tests also show that a remembered digest does not hide a change)."""
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        key = _machine(sbx).snapshot_key
        store = _machine(sbx).snapshots
    assert key is not None
    state = store.lookup(key)
    assert state is not None, "no boot snapshot was saved"
    # A digest is remembered only once the file is older than RACY_NS.
    age_ns = time.time_ns() - state.stat().st_ctime_ns
    time.sleep(max(0.0, (digests.RACY_NS - age_ns) / 1e9 + 0.1))
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "snapshot"
        assert _hello_agent(sbx) == AGENT_NAME
    record = json.loads((Paths.from_env().cache / "verified.json").read_text())
    st = state.stat()
    entry = record["files"][str(state)]
    assert (entry["ino"], entry["size"], entry["ctime_ns"]) == (
        st.st_ino,
        st.st_size,
        st.st_ctime_ns,
    )
    yield state.parent


def _flip(path: Path, offsets: list[int]) -> bytes:
    """Flip bit 5 of the bytes at ``offsets`` in place (same file, same size); the new bytes."""
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x20]))
    return path.read_bytes()


def _device_state_start(data: bytes) -> int:
    timer = TIMER_SECTION.search(data, len(data) - (4 << 20))
    assert timer is not None, "no device sections found at the end of the stream"
    return timer.start()


def _assert_refused_and_rebuilt(
    snapshot: Path, tampered: bytes, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    """A VM of this configuration boots cold, the tampered file is gone and a fresh sealed
    snapshot is restored by the next VM."""
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger=SNAPSHOT_LOG),
        Sandbox.create(memory_mib=MEMORY) as sbx,
    ):
        assert _machine(sbx).booted_from == "cold"
        assert _hello_agent(sbx) == AGENT_NAME
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0], refusals
    fresh = (snapshot / STATE_FILE).read_bytes()
    assert _sha(fresh) != _sha(tampered), "the tampered file is still there"
    assert TAMPERED_MARKER not in fresh
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "snapshot", "no fresh sealed snapshot was saved"
        assert _hello_agent(sbx) == AGENT_NAME


def test_a_flipped_byte_in_the_device_state_is_refused(
    snapshot: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = snapshot / STATE_FILE
    data = state.read_bytes()
    devices = _device_state_start(data)
    cpu = CPU_SECTION.search(data, devices)
    assert cpu is not None
    offset = cpu.end() + 4 + 8  # past the version: inside the vCPU's registers
    tampered = _flip(state, [offset])
    assert len(tampered) == len(data) and tampered != data
    _assert_refused_and_rebuilt(snapshot, tampered, caplog, "changed after it was sealed")


def test_a_flipped_byte_in_guest_memory_never_runs(
    snapshot: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = snapshot / STATE_FILE
    data = state.read_bytes()
    devices = _device_state_start(data)
    found = [m.start() for m in re.finditer(re.escape(MARKER), data[:devices])]
    assert found, f"{AGENT_NAME!r} is not in the snapshot's guest memory"
    tampered = _flip(state, found)  # one byte per copy of the agent's name
    assert TAMPERED_MARKER in tampered

    # Control: with the check skipped (only here), the flipped byte is what the agent runs
    # with. This is what the test would see if the seal were not checked.
    with monkeypatch.context() as m:
        m.setattr(BootSnapshots, "_verify", lambda *_args: None)
        with Sandbox.create(memory_mib=MEMORY) as sbx:
            assert _machine(sbx).booted_from == "snapshot"
            assert _hello_agent(sbx) == TAMPERED_MARKER.decode()
    assert state.read_bytes() == tampered

    _assert_refused_and_rebuilt(snapshot, tampered, caplog, "changed after it was sealed")


def _reseal(snapshot: Path, sealer: Sealer, change: dict[str, Any]) -> bytes:
    """Rewrite meta.json with ``change``, sealed by ``sealer``; the unchanged state.bin."""
    meta = json.loads((snapshot / META_FILE).read_text())
    meta = sealer.seal({**meta, **change})
    (snapshot / META_FILE).write_text(json.dumps(meta))
    return (snapshot / STATE_FILE).read_bytes()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"memory_mib": 512}, f"another configuration (memory_mib 512, this VM {MEMORY})"),
        ({"rootfs_sha256": "0" * 64}, "another configuration (rootfs_sha256"),
    ],
)
def test_metadata_that_claims_another_configuration_is_refused(
    snapshot: Path, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str
) -> None:
    """Sealed with the host key (as only root could), but not for this machine."""
    state = _reseal(snapshot, Sealer(Paths.from_env(), SEAL_PURPOSE), change)
    _assert_refused_and_rebuilt(snapshot, state, caplog, reason)


def test_a_snapshot_sealed_with_another_key_is_refused(
    snapshot: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A genuine snapshot of this configuration, sealed with another host's key."""
    other_host = Sealer(Paths(tmp_path / "other-host"), SEAL_PURPOSE)
    state = _reseal(snapshot, other_host, {})
    assert os.path.exists(tmp_path / "other-host" / "keys" / "seal.key")
    _assert_refused_and_rebuilt(snapshot, state, caplog, "sealed with another host key")
