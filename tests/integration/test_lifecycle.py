"""VM lifecycle: several VMs at once, nothing left behind, bad input refused cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from warden import (
    AgentTimeoutError,
    AsyncSandbox,
    ImageError,
    Sandbox,
    SandboxClosedError,
    SpecError,
)
from warden.agent.client import AgentClient
from warden.config import Paths
from warden.vmm.argv import XFER_SLOT_SIZE, XFER_SLOTS
from warden.vmm.machine import Machine
from warden.vmm.ownership import proc_start_time
from warden.vmm.spec import VMSpec

from ..conftest import qemu_pids, runtime_dirs

pytestmark = pytest.mark.vm


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


async def test_three_vms_at_once(no_leaks: None) -> None:
    sandboxes = await asyncio.gather(*(AsyncSandbox.create(memory_mib=160) for _ in range(3)))
    try:
        assert len({s.id for s in sandboxes}) == 3
        # Each VM has its own writable layer: a file in one is not in another.
        await sandboxes[0].files.write("/home/user/only-here", "1")
        results = await asyncio.gather(
            *(
                s.commands.run("test -e /home/user/only-here && echo yes || echo no")
                for s in sandboxes
            )
        )
        assert [r.stdout for r in results] == ["yes\n", "no\n", "no\n"]
    finally:
        await asyncio.gather(*(s.kill() for s in sandboxes))


def test_close_leaves_nothing(no_leaks: None) -> None:
    sbx = Sandbox.create()
    machine = _machine(sbx)
    pid, rundir = machine.pid, machine.run.dir
    assert pid is not None and proc_start_time(pid) is not None and rundir.is_dir()
    sbx.kill()
    sbx.kill()  # twice is fine
    assert proc_start_time(pid) is None
    assert not rundir.exists()


def test_sigkill_of_the_owner_leaves_nothing(tmp_path: Path) -> None:
    """The owning process dies by SIGKILL: its QEMU dies with it, its files are removed."""
    code = (
        "import sys, time, warden\n"
        "sbx = warden.Sandbox.create()\n"
        "m = sbx._inner._machine\n"
        "print(m.pid, m.run.dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().split()
        assert len(line) == 2, "the owner did not start a VM"
        qemu_pid, rundir = int(line[0]), Path(line[1])
        assert proc_start_time(qemu_pid) is not None
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 15
        while (proc_start_time(qemu_pid) is not None or rundir.exists()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert proc_start_time(qemu_pid) is None, "QEMU outlived its owner"
        assert not rundir.exists(), "the runtime dir outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_invalid_spec_starts_nothing(no_leaks: None) -> None:
    before = qemu_pids()
    with pytest.raises(SpecError, match="memory_mib"):
        Sandbox.create(memory_mib=0)
    with pytest.raises(SpecError, match="vcpus"):
        Sandbox.create(vcpus=-1)
    assert qemu_pids() == before


def test_unknown_image_says_how_to_build_it(no_leaks: None) -> None:
    with pytest.raises(ImageError, match="warden image build"):
        Sandbox.create(image="nosuchimage")


def test_agent_deadline_quotes_the_console(no_leaks: None) -> None:
    before = runtime_dirs()
    with pytest.raises(AgentTimeoutError, match="console tail") as info:
        Sandbox.create(timeout=0.3, boot="cold")
    assert "agent_timeout_s" in str(info.value) or "timeout" in str(info.value)
    assert runtime_dirs() == before


def test_stale_runtime_dirs_are_swept_on_start(no_leaks: None) -> None:
    stale = Paths.from_env().vms / "stale0000000"
    stale.mkdir(parents=True)
    (stale / "owner.json").write_text('{"owner_pid": 999999999, "owner_start": 1}')
    with Sandbox.create() as sbx:
        assert sbx.commands.run("true").exit_code == 0
    assert not stale.exists()


def test_a_vm_whose_qemu_dies_is_marked_failed_and_released(no_leaks: None) -> None:
    sbx = Sandbox.create()
    machine = _machine(sbx)
    pid, rundir = machine.pid, machine.run.dir
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # by its recorded pid, as an outside failure would
    deadline = time.monotonic() + 5
    while sbx.state != "failed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sbx.state == "failed"
    assert not rundir.exists()
    with pytest.raises(SandboxClosedError, match="exited with code"):
        sbx.commands.run("true")
    sbx.kill()  # still safe


@pytest.mark.parametrize("gap", [0.0, 0.5])
async def test_a_new_host_takes_over_an_agent_left_mid_transfer(gap: float, no_leaks: None) -> None:
    """What a manager restarted after kill -9 meets: the old host died in the middle of an
    upload, so the agent is still busy with its requests (and still sends their frames), and the
    port may never have shown it an EOF. The new host connects as Machine.attach does
    (``resync=True``) and gets a working session, every time."""
    # 256 MiB: the endless uploads fill the guest's tmpfs (half its RAM); at 128 MiB what is
    # left for the kernel, the agent (25 MB with its crypto) and the page cache made the guest
    # thrash for minutes (its vCPU at 100%), and no host could talk to it meanwhile.
    machine = Machine(VMSpec(memory_mib=256))
    await machine.launch()
    try:
        await machine.agent.close()
        for _ in range(3):
            secret = machine.channel_keys.current(machine.id)
            old = await AgentClient.connect_unix(machine.run.agent, timeout=10, secret=secret)
            old.enable_xfer(machine.run.xfer, slots=XFER_SLOTS, slot_size=XFER_SLOT_SIZE)

            async def endless() -> AsyncIterator[bytes]:
                chunk = os.urandom(1 << 20)
                while True:
                    yield chunk

            upload = asyncio.create_task(old.write_file("/home/user/big", endless()))
            await asyncio.sleep(0.3)
            old._writer.transport.abort()  # the old host dies mid-frame, without a goodbye
            with pytest.raises(SandboxClosedError):
                await upload
            await asyncio.sleep(gap)
            new = await AgentClient.connect_unix(
                machine.run.agent, timeout=20, resync=True, secret=secret
            )
            try:
                result = await new.exec(["sh", "-c", "ls -a /home/user; echo done"])
                assert result.exit_code == 0 and result.stdout.endswith(b"done\n")
                assert b"big" not in result.stdout  # the old upload's temp file is gone too
            finally:
                await new.close()
    finally:
        await machine.shutdown()
