"""What only a ring link has: a shared-memory region in link slots (``vmm/linkslots.py``).

Real VMs under TCG, an in-process Manager. The host reads the region (the daemon holds its
memfd) to check that it only ever holds ciphertext, and that a removed link's region is
zeroed, truncated and unplugged; the slot limit is reached and passed; a third VM sees
nothing. The stream itself (256 MiB each way, sha256-checked) is in test_links.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.integration.test_links import sandboxes
from warden._errors import LinkError, StateTransitionError
from warden.server.manager import Manager
from warden.store.db import DAEMON_OWNER
from warden.vmm.linkslots import LINK_SLOTS, MEMFD_NAME
from warden.vmm.machine import Machine
from warden.wire.ring import CAPACITY, DATA

pytestmark = pytest.mark.vm

MARKER = b"PLAINTEXT-MARKER-0123456789-"
WRITER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(3)
block = sys.argv[2].encode() * 4096
sent = 0
try:
    while sent < 1 << 20:
        sent += s.send(block)
except OSError:
    pass
print(sent)
"""
"""Writes the marker until 1 MiB went into the link (the other end reads nothing: the bytes
stay in the ring, where the host looks for them)."""

LIST_IVSHMEM = (
    "for d in /sys/bus/pci/devices/*; do "
    'if [ "$(cat $d/vendor):$(cat $d/device)" = "0x1af4:0x1110" ]; then echo $d; fi; done'
)


@dataclass
class Trio:
    manager: Manager
    a: Machine
    b: Machine
    c: Machine


@pytest.fixture
async def trio(no_leaks: None) -> AsyncIterator[Trio]:
    async with sandboxes((DAEMON_OWNER,) * 3) as (manager, machines):
        yield Trio(manager, *machines)


async def devices(machine: Machine) -> list[str]:
    result = await machine.agent.exec(["sh", "-c", LIST_IVSHMEM])
    return result.stdout.decode().split()


async def wait_devices(machine: Machine, count: int) -> None:
    for _ in range(100):
        if len(await devices(machine)) == count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{machine.id} has {await devices(machine)}, not {count} link devices")


async def fill_ring(trio: Trio, name: str) -> bytes:
    """A writes the marker into link ``name`` (B reads nothing); the region's data bytes."""
    path = f"/run/warden/links/{name}.sock"
    result = await trio.a.agent.exec(["python3", "-c", WRITER, path, MARKER.decode()], timeout=60)
    assert result.exit_code == 0, result.stderr
    assert int(result.stdout) > 64 << 10  # the ring took the records
    region = trio.manager.links.region(name)
    assert region is not None
    return region.read(DATA[0], CAPACITY)


async def test_the_region_holds_only_ciphertext_and_is_zeroed_when_removed(trio: Trio) -> None:
    await trio.manager.links.create(trio.a.id, trio.b.id, "secret")
    region = trio.manager.links.region("secret")
    assert region is not None
    probe = os.dup(region.fd)  # the daemon closes its own once both VMs let go
    try:
        ring = await fill_ring(trio, "secret")
        assert ring.count(0) < len(ring) // 2, "the records are in the region"
        assert MARKER not in ring and MARKER[:12] not in ring
        _, took = await trio.manager.links.remove("secret")
        assert took < 0.1
        assert region.revoked and os.fstat(probe).st_size == 0  # no QEMU maps any of it
    finally:
        os.close(probe)
    await wait_devices(trio.a, 0)
    await wait_devices(trio.b, 0)
    for _ in range(50):
        if not trio.a.link_slots.busy and not trio.b.link_slots.busy:
            break
        await asyncio.sleep(0.1)
    assert trio.a.link_slots.busy == [] and trio.b.link_slots.busy == []


async def test_the_plaintext_ring_shows_the_marker_so_the_check_above_can_fail(
    trio: Trio,
) -> None:
    await trio.manager.links.create(trio.a.id, trio.b.id, "plain", plain=True)
    ring = await fill_ring(trio, "plain")
    assert MARKER in ring


async def test_a_third_vm_sees_no_link_and_each_end_one_device(trio: Trio) -> None:
    await trio.manager.links.create(trio.a.id, trio.b.id, "pair")
    await wait_devices(trio.a, 1)
    await wait_devices(trio.b, 1)
    assert await devices(trio.c) == []
    listing = await trio.c.agent.exec(["ls", "-A", "/run/warden/links"])
    assert b"pair" not in listing.stdout
    assert trio.c.link_slots.busy == []


def _holds_region(pid: int) -> bool:
    """Whether process ``pid`` has a link's region (a memfd: no path in any filesystem, so a
    process can reach it only through an fd it was given or a mapping of it)."""
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    with open(f"/proc/{pid}/maps") as maps:
        held += [line.rstrip("\n") for line in maps]
    return any(f"/memfd:{MEMFD_NAME}" in entry for entry in held)


async def test_the_region_is_only_in_the_two_jailed_qemus(trio: Trio) -> None:
    """The link's memory file reaches the jails of its two VMs only: their QEMUs hold and map
    it; the third VM's QEMU has neither an fd of it nor a mapping (a memfd has no path that a
    jail could bind or open)."""
    assert all(m.jail is not None for m in (trio.a, trio.b, trio.c))
    await trio.manager.links.create(trio.a.id, trio.b.id, "jailed")
    await wait_devices(trio.a, 1)
    await wait_devices(trio.b, 1)
    assert _holds_region(trio.a.pid or 0) and _holds_region(trio.b.pid or 0)
    assert not _holds_region(trio.c.pid or 0)


async def test_links_up_to_the_slot_limit_then_a_clear_error(trio: Trio) -> None:
    links = trio.manager.links
    for i in range(LINK_SLOTS):
        await links.create(trio.a.id, trio.b.id, f"l{i}")
    await wait_devices(trio.a, LINK_SLOTS)
    with pytest.raises(LinkError, match=f"all {LINK_SLOTS} link slots in use"):
        await links.create(trio.a.id, trio.c.id, "one-too-many")
    # Nothing of the refused link is left: no slot of C, no socket in C.
    assert trio.c.link_slots.busy == [] and await devices(trio.c) == []
    with pytest.raises(StateTransitionError, match="link devices in place"):
        await trio.manager.pause(trio.a.id)
    for i in range(LINK_SLOTS):
        await links.remove(f"l{i}")
    await wait_devices(trio.a, 0)
    for _ in range(50):
        if not trio.a.link_slots.busy:
            break
        await asyncio.sleep(0.1)
    assert trio.a.link_slots.busy == []
    await links.create(trio.a.id, trio.c.id, "after")  # the slots are free again
    await links.remove("after")
