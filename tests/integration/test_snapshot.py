"""Boot snapshots: restored VMs work, are not twins of each other, and a bad one is replaced."""

from __future__ import annotations

import time

import pytest

from warden import Sandbox
from warden.vmm.machine import Machine

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


def test_a_broken_snapshot_is_replaced_by_a_cold_boot(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        key = _machine(sbx).snapshot_key
        store = _machine(sbx).snapshots
    assert key is not None
    state = store.lookup(key)
    assert state is not None
    state.write_bytes(b"not a migration stream")
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "cold"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    fresh = store.lookup(key)
    assert fresh is not None and fresh.stat().st_size > 1_000_000
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "snapshot"


def test_cold_boot_on_request(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=MEMORY, boot="cold") as sbx:
        assert _machine(sbx).booted_from == "cold"
        assert sbx.commands.run(["true"]).exit_code == 0
