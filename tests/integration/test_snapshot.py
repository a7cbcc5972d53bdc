"""Boot snapshots: restored VMs work, are not twins of each other, are sealed for their
configuration, and a bad one is replaced (tampering: tests/security/test_sealed_snapshots.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest

from warden import Sandbox
from warden.vmm.machine import Machine
from warden.vmm.snapshot import META_FILE

pytestmark = pytest.mark.vm

# A memory size no other test uses, so these tests own their snapshot.
MEMORY = 208


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def test_restored_vms_work_and_differ(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY) as first:
        assert _machine(first).booted_from in ("cold", "snapshot")
        key = _machine(first).snapshot_key
        assert key is not None
    assert _machine(first).snapshots.lookup(key) is not None, "no snapshot was saved"
    seen: list[tuple[str, str]] = []
    for _ in range(2):
        with Sandbox.create(memory_mib=MEMORY) as sbx:
            assert _machine(sbx).booted_from == "snapshot"
            r = sbx.commands.run("head -c 16 /dev/urandom | od -An -tx1; date +%s")
            rand, clock = r.stdout.strip().rsplit("\n", 1)
            # The guest clock was set from the host at HELLO, not left at snapshot time.
            assert abs(int(clock) - time.time()) < 30
            sbx.files.write("/home/user/f", "works")
            assert sbx.files.read("/home/user/f") == "works"
            seen.append((rand, clock))
    assert seen[0][0] != seen[1][0], "two restored VMs produced the same random bytes"


def test_the_seal_binds_the_configuration(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        machine = _machine(sbx)
        key = machine.snapshot_key
        image = machine.image
    assert key is not None and image is not None
    state = machine.snapshots.lookup(key)
    assert state is not None
    meta = json.loads((state.parent / META_FILE).read_text())
    assert meta["seal"]["alg"] == "HMAC-SHA256" and len(meta["seal"]["tag"]) == 64
    assert (meta["key"], meta["memory_mib"], meta["vcpus"]) == (key, MEMORY, 1)
    assert meta["qemu_version"].startswith("QEMU emulator version")
    assert (meta["kernel_sha256"], meta["initrd_sha256"], meta["rootfs_sha256"]) == (
        image.kernel.sha256,
        image.initrd.sha256,
        image.rootfs.sha256,
    )
    assert meta["state_size"] == state.stat().st_size
    assert meta["state_sha256"] == hashlib.sha256(state.read_bytes()).hexdigest()


@pytest.mark.parametrize("sealed", [False, True])
def test_a_broken_snapshot_is_replaced_by_a_cold_boot(
    no_leaks: None, sealed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage is refused by its seal; garbage sealed with the host key (as only root could)
    passes the seal, and QEMU's failure to load it is caught instead."""
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        key = _machine(sbx).snapshot_key
        store = _machine(sbx).snapshots
    assert key is not None
    state = store.lookup(key)
    assert state is not None
    garbage = b"not a migration stream"
    state.write_bytes(garbage)
    if sealed:
        meta = json.loads((state.parent / META_FILE).read_text())
        meta |= {"state_size": len(garbage), "state_sha256": hashlib.sha256(garbage).hexdigest()}
        (state.parent / META_FILE).write_text(json.dumps(store.sealer.seal(meta)))
    with caplog.at_level(logging.WARNING), Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "cold"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    why = "did not restore" if sealed else "the file was changed after it was sealed"
    assert why in caplog.text
    fresh = store.lookup(key)
    assert fresh is not None and fresh.stat().st_size > 1_000_000
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "snapshot"


def test_cold_boot_on_request(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY, boot="cold") as sbx:
        assert _machine(sbx).booted_from == "cold"
        assert sbx.commands.run(["true"]).exit_code == 0
