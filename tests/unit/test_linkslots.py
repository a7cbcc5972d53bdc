"""Link slots on the host (``vmm/linkslots.py``) without a VM: the region's memfd, its
revocation (also in another process, as after a daemon restart), the slot bookkeeping and
QEMU's arguments. Plugging into a real QEMU is tests/integration/test_links_ring.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from warden._errors import LinkError, StateTransitionError
from warden.vmm.argv import kernel_cmdline
from warden.vmm.linkslots import (
    LINK_SLOTS,
    MEMFD_NAME,
    Region,
    Slots,
    machine_option,
    revoke_held,
    slot_args,
)
from warden.wire.ring import REGION_SIZE, RingLayoutError, check_header

LINK_ID = bytes(range(16))


def test_a_region_is_a_sized_memfd_with_this_links_header() -> None:
    region = Region(LINK_ID)
    try:
        assert os.fstat(region.fd).st_size == REGION_SIZE
        check_header(region.read(0, 64), LINK_ID)
        with pytest.raises(RingLayoutError, match="another link"):
            check_header(region.read(0, 64), bytes(16))
        assert region.read(4096, 4096) == bytes(4096)
        with pytest.raises(OSError):  # sealed against growing
            os.ftruncate(region.fd, REGION_SIZE * 2)
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith(f"/memfd:{MEMFD_NAME} ")
    finally:
        region.close()


def test_revoke_zeroes_and_truncates_what_every_mapping_sees() -> None:
    import mmap

    region = Region(LINK_ID)
    view = mmap.mmap(region.fd, REGION_SIZE)
    try:
        view[8192:8200] = b"SECRET!!"
        assert region.read(8192, 8) == b"SECRET!!"
        region.revoke()
        assert os.fstat(region.fd).st_size == 0
        assert region.read(8192, 8) == b""
    finally:
        view.close()  # never touched again: a touch now would fault (SIGBUS)
        region.close()
    assert region.fd == -1


HOLDER = f"""
import os, sys
fd = os.memfd_create({MEMFD_NAME!r}, 0)
os.ftruncate(fd, 1 << 16)
os.pwrite(fd, b"HELD", 100)
other = os.memfd_create("not-a-link", 0)
os.ftruncate(other, 4096)
print(fd, other, flush=True)
sys.stdin.readline()
print(os.fstat(fd).st_size, os.fstat(other).st_size, flush=True)
"""


def test_revoke_held_truncates_the_link_regions_another_process_holds() -> None:
    """What a restarted daemon does to a QEMU whose links died with the old daemon."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        assert revoke_held(proc.pid) == 1
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["0", "4096"]  # only the link's region
    finally:
        proc.kill()
        proc.wait()


def test_slots_are_reserved_up_to_the_limit_then_refused_clearly() -> None:
    slots = Slots()
    taken = [slots.reserve(f"l{i}", "vm1") for i in range(LINK_SLOTS)]
    assert [s.index for s in taken] == list(range(LINK_SLOTS))
    with pytest.raises(LinkError, match=rf"all {LINK_SLOTS} link slots in use \(l0, l1"):
        slots.reserve("one-more", "vm1")
    with pytest.raises(StateTransitionError, match="link devices in place"):
        slots.check_none("vm1", "pause it")
    taken[1].link, taken[1].draining = None, True  # unplugged, not yet released
    with pytest.raises(LinkError):
        slots.reserve("one-more", "vm1")
    taken[1].draining = False
    assert slots.reserve("one-more", "vm1").index == 1
    with pytest.raises(LinkError, match="no link slots"):
        Slots(0).reserve("x", "vm2")
    Slots().check_none("vm3", "pause it")


def test_the_machine_gets_root_ports_and_pciehp_only_with_slots() -> None:
    assert machine_option(0) == "" and machine_option(4) == "pcie=on,"
    assert slot_args(0) == []
    args = slot_args(2)
    assert args[0::2] == ["-device", "-device"]
    assert "pcie-root-port,id=link-port1,bus=pcie.0,chassis=2" in args[3]
    assert "pcie_ports" not in kernel_cmdline("agent")
