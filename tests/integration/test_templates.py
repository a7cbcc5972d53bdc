"""Templates and clones on real VMs (embedded ``Machine``): a clone carries on from its
template, clones are new machines that diverge safely, and they share the template's RAM.

Tampering and the jail of a clone: tests/security/test_template_seal.py.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from warden._errors import TemplateNotFoundError
from warden.config import Paths
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import Templates

pytestmark = pytest.mark.vm

MEMORY = 256
MARK = "/home/user/made-before-the-capture"


async def sh(machine: Machine, command: str) -> str:
    """Run ``command`` as root in ``machine``; its stdout (it must succeed)."""
    result = await machine.agent.exec(["sh", "-c", command], user="root", timeout=60)
    assert result.exit_code == 0, (command, result.stderr.decode(errors="replace"))
    return result.stdout.decode()


def rollup_mib(pid: int, *fields: str) -> int:
    """The sum of ``fields`` of ``/proc/<pid>/smaps_rollup`` (a QEMU: guest RAM included), in
    MiB; AssertionError if none of them is there."""
    kib, found = 0, False
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in fields:
                kib, found = kib + int(rest.split()[0]), True
    assert found, f"no {fields} in /proc/{pid}/smaps_rollup"
    return kib // 1024


def pss_mib(pid: int) -> int:
    """The PSS of process ``pid``, in MiB."""
    return rollup_mib(pid, "Pss")


@pytest.fixture
def template_name() -> Iterator[str]:
    """A fresh template name; the template is removed after the test if it is still there."""
    name = f"t-{secrets.token_hex(4)}"
    yield name
    store = Templates(Paths.from_env())
    if store.path(name).exists():
        store.remove(name)


@asynccontextmanager
async def running(spec: VMSpec) -> AsyncIterator[Machine]:
    machine = Machine(spec)
    await machine.launch()
    try:
        yield machine
    finally:
        await machine.shutdown()


async def prepare_source(source: Machine) -> str:
    """Leave state in ``source`` for its clones to find: a file, and a background process
    (its pid is returned)."""
    await sh(source, f"echo template-state > {MARK}")
    pid = await sh(source, "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!")
    return pid.strip()


async def test_a_clone_carries_on_from_its_template(no_leaks: None, template_name: str) -> None:
    async with running(VMSpec(memory_mib=MEMORY)) as source:
        sleeper = await prepare_source(source)
        before = source.channel_keys.current(source.id)
        await source.save_template(template_name, keep_running=True)
        # The source keeps running, with a new channel secret: the template holds its old one.
        assert source.state.value == "running"
        assert await sh(source, f"cat {MARK}") == "template-state\n"
        after = source.channel_keys.current(source.id)
        held = source.channel_keys.template(template_name)
        assert before is not None and after is not None and held is not None
        assert after not in (before, held)
        # The source's old secret is the template's (its guest holds it in the saved state).
        assert held == before
        async with running(VMSpec(template=template_name)) as clone:
            assert clone.booted_from == "template"
            assert (clone.spec.memory_mib, clone.spec.image) == (MEMORY, source.spec.image)
            assert await sh(clone, "echo works; uname -s") == "works\nLinux\n"
            assert await sh(clone, f"cat {MARK}") == "template-state\n"
            # The process started before the capture still runs in the clone.
            alive = await sh(clone, f"kill -0 {sleeper} && tr '\\0' ' ' < /proc/{sleeper}/cmdline")
            assert alive.startswith("sleep 100000"), alive
        # The source still answers after its clone is gone.
        assert await sh(source, "echo still") == "still\n"


async def _identity(machine: Machine) -> tuple[str, str]:
    """The guest's hostname and 32 bytes of its RNG, as hex."""
    out = await sh(machine, "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
    hostname, rng = out.split("\n", 1)
    return hostname, rng


async def test_clones_are_new_machines_that_diverge_safely(
    no_leaks: None, template_name: str
) -> None:
    # Booted cold: the baseline of the PSS check below is a cold VM.
    async with running(VMSpec(memory_mib=MEMORY, boot="cold")) as source:
        await prepare_source(source)
        cold_pss = pss_mib(source.pid or 0)
        await source.save_template(template_name, keep_running=False)
    store = Templates(Paths.from_env())
    template_key = store.keys.template(template_name)
    assert template_key is not None
    async with (
        running(VMSpec(template=template_name)) as a,
        running(VMSpec(template=template_name)) as b,
    ):
        assert a.id != b.id
        (host_a, rng_a), (host_b, rng_b) = await _identity(a), await _identity(b)
        assert (host_a, host_b) == (a.id, b.id), "a clone's hostname is its VM id"
        assert len(rng_a) == len(rng_b) == 64 and rng_a != rng_b
        keys = [a.channel_keys.current(a.id), b.channel_keys.current(b.id)]
        assert None not in keys and keys[0] != keys[1]
        assert template_key not in keys, "a clone still talks with its template's secret"
        # Writes diverge: a page one clone writes is its own.
        await sh(a, f"echo only-in-a > {MARK}; echo new > /home/user/a-only; sync")
        assert await sh(b, f"cat {MARK}") == "template-state\n"
        assert await sh(b, "test ! -e /home/user/a-only && echo absent") == "absent\n"
        assert await sh(a, f"cat {MARK} /home/user/a-only") == "only-in-a\nnew\n"
        # ... and the template's RAM is untouched: a clone made after the write sees none of it.
        async with running(VMSpec(template=template_name)) as c:
            assert await sh(c, f"cat {MARK}") == "template-state\n"
            assert await sh(c, "test ! -e /home/user/a-only && echo absent") == "absent\n"
        # Clones share the template's RAM: each costs well under a cold VM (the exact numbers
        # are in the benchmark; the bound here is generous against noise).
        clone_pss = max(pss_mib(a.pid or 0), pss_mib(b.pid or 0))
        assert clone_pss < 0.75 * cold_pss, (clone_pss, cold_pss)


async def test_removing_a_template_leaves_its_clones_running(
    no_leaks: None, template_name: str
) -> None:
    async with running(VMSpec(memory_mib=MEMORY)) as source:
        await prepare_source(source)
        await source.save_template(template_name, keep_running=False)
    store = Templates(Paths.from_env())
    async with running(VMSpec(template=template_name)) as clone:
        store.remove(template_name)
        assert not store.path(template_name).exists()
        assert store.keys.template(template_name) is None
        await sh(clone, "dd if=/dev/urandom of=/home/user/big bs=1M count=8 2>/dev/null")
        assert await sh(clone, f"cat {MARK}; echo ok") == "template-state\nok\n"
        with pytest.raises(TemplateNotFoundError, match="no template is named"):
            await Machine(VMSpec(template=template_name)).launch()
