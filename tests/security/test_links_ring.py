"""A hostile guest and a link's shared memory (``vmm/linkslots.py``), on real VMs under TCG.

A guest's root can map its link device itself and refuse to let it go. Revocation must not
depend on its goodwill: the host zeroes and truncates the region, so what that guest writes
afterwards reaches no other guest, and the only one hurt is itself (its QEMU faults).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from warden.vmm.linkslots import Region
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

pytestmark = pytest.mark.vm

# Run as root in the guest: map the link device, write WORD at 8192, wait for /tmp/go, then
# write AFTER there. Prints what it saw.
HOLD = r"""
import glob, mmap, os, sys, time
word = sys.argv[1].encode()
for _ in range(200):
    found = [d for d in glob.glob("/sys/bus/pci/devices/*")
             if open(d + "/device").read().strip() == "0x1110"]
    if found:
        break
    time.sleep(0.05)
d = found[0]
open(d + "/enable", "w").write("1")
fd = os.open(d + "/resource2", os.O_RDWR | os.O_SYNC)
view = mmap.mmap(fd, 4 << 20)
view[8192:8200] = word
print("wrote", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.02)
print("saw", bytes(view[16384:16392]), flush=True)
view[8192:8200] = b"AFTER!!!"
print("wrote after", flush=True)
"""


@pytest.fixture
async def machines(no_leaks: None) -> AsyncIterator[list[Machine]]:
    started: list[Machine] = []
    try:
        for _ in range(2):
            machine = Machine(VMSpec())
            await machine.launch()
            started.append(machine)
        yield started
    finally:
        for machine in started:
            await machine.kill()


async def root(machine: Machine, cmd: str) -> str:
    result = await machine.agent.exec(["sh", "-c", cmd], user="root", timeout=60)
    return result.stdout.decode() + result.stderr.decode()


async def test_a_guest_that_keeps_writing_after_revocation_reaches_nobody(
    machines: list[Machine],
) -> None:
    a, b = machines
    region = Region(os.urandom(16))
    try:
        slot_a = await a.plug_link("held", region)
        slot_b = await b.plug_link("held", region)
        for machine, word in ((a, "FROM-A!!"), (b, "FROM-B!!")):
            script = HOLD.replace("16384", "8192") if machine is b else HOLD
            await root(machine, f"cat > /tmp/hold.py <<'E'\n{script}\nE\n")
            await root(machine, f"nohup python3 /tmp/hold.py {word} > /tmp/hold.log 2>&1 &")
        # Both must have written before the revocation: a guest that first touches the region
        # after it faults too (that is the point), and B must stay alive here.
        for machine in (a, b):
            for _ in range(300):
                if "wrote" in await root(machine, "cat /tmp/hold.log"):
                    break
                await asyncio.sleep(0.1)
            assert "wrote" in await root(machine, "cat /tmp/hold.log")
        assert region.read(8192, 8) in (b"FROM-A!!", b"FROM-B!!")  # the memory is shared
        region.revoke()  # what link rm does once both agents answered (or timed out)
        assert os.fstat(region.fd).st_size == 0
        # A writes into the revoked region and its QEMU faults: start that after this exec has
        # answered, or A may die before the answer comes back.
        await root(a, "nohup sh -c 'sleep 0.5; touch /tmp/go' >/dev/null 2>&1 &")
        # Its agent channel may break (UNHEALTHY) before the exit is reaped (FAILED): wait for both.
        for _ in range(200):
            if a.state is VMState.FAILED and a.exit_code is not None:
                break
            await asyncio.sleep(0.1)
        assert a.state is VMState.FAILED
        assert a.exit_code is not None and a.exit_code < 0  # a signal (SIGBUS)
        assert await root(b, "echo alive") == "alive\n"  # B never saw it, and runs on
        assert region.read(8192, 8) == b""
        await b.unplug_link(slot_b)
        del slot_a
    finally:
        region.close()
