"""Fork (``Machine.fork``) on real VMs: children carry on from their parent's files and
processes and are new machines; the parent keeps running; a fork that fails leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.conftest import qemu_pids, runtime_dirs
from tests.integration.test_templates import MARK, prepare_source, pss_mib, rollup_mib, sh
from warden import Sandbox
from warden._errors import HostError, SpecError, VMError
from warden.config import Paths
from warden.vmm import fork as fork_module
from warden.vmm.fork import ForkStore
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec

pytestmark = pytest.mark.vm


def private_mib(pid: int) -> int:
    return rollup_mib(pid, "Private_Clean", "Private_Dirty")


def rss_mib(pid: int) -> int:
    return rollup_mib(pid, "Rss")


@asynccontextmanager
async def running(spec: VMSpec) -> AsyncIterator[Machine]:
    machine = Machine(spec)
    await machine.launch()
    try:
        yield machine
    finally:
        await machine.shutdown()


def _fork_leftovers() -> list[str]:
    """Transient fork templates still held: this process's memfds of forks."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/memfd:warden-fork"):
                found.append(target)
    return found


async def test_fork_children_carry_on_from_their_parent(no_leaks: None) -> None:
    async with running(VMSpec(memory_mib=256)) as parent:
        sleeper = await prepare_source(parent)
        await sh(parent, "echo 41 > /home/user/counter")
        children = await parent.fork(2)
        try:
            assert len(children) == 2 and not _fork_leftovers()
            for child in children:
                assert child.booted_from == "template" and child.forked_from == parent.id
                assert child.spec.template is None and child.templates is parent.templates
                assert await sh(child, f"cat {MARK} /home/user/counter") == ("template-state\n41\n")
                alive = await sh(
                    child, f"kill -0 {sleeper} && tr '\\0' ' ' < /proc/{sleeper}/cmdline"
                )
                assert alive.startswith("sleep 100000"), alive
                assert await sh(child, "hostname") == f"{child.id}\n"
            a, b = children
            assert len({parent.id, a.id, b.id}) == 3
            # They share the parent's memory as it was (a sealed copy each maps copy-on-write):
            # neither holds a private copy of the guest's RAM (the parent, itself a clone, saved
            # without RAM in its device state; with it, each child held 128 MiB of its own).
            for child in children:
                assert private_mib(child.pid or 0) < 0.5 * parent.spec.memory_mib
                assert pss_mib(child.pid or 0) < 0.8 * rss_mib(child.pid or 0)
            keys = {m.channel_keys.current(m.id) for m in (parent, a, b)}
            assert None not in keys and len(keys) == 3
            # Each carries on by itself: the parent and the children diverge.
            await sh(a, "echo 42 > /home/user/counter")
            await sh(parent, "echo 43 > /home/user/counter")
            assert await sh(b, "cat /home/user/counter") == "41\n"
            assert await sh(a, "cat /home/user/counter") == "42\n"
            assert await sh(parent, f"cat /home/user/counter; kill -0 {sleeper} && echo up") == (
                "43\nup\n"
            )
        finally:
            for child in children:
                await child.shutdown()
        # The parent keeps running after its children are gone.
        assert await sh(parent, "echo still") == "still\n"


async def test_a_failed_fork_leaves_no_trace(
    no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(VMSpec(memory_mib=256)) as parent:
        await sh(parent, "echo kept > /home/user/kept")
        pids, dirs = qemu_pids(), runtime_dirs()
        for bad in (0, -1, 17, True):
            with pytest.raises(SpecError, match="a fork makes 1 to 16 children"):
                await parent.fork(bad)
        # One child cannot start: the other is stopped, the transient template removed.
        real_child = fork_module._child
        made: list[Machine] = []

        def second_fails(*args: object) -> Machine:
            child = real_child(*args)  # type: ignore[arg-type]
            made.append(child)
            if len(made) == 2:
                child.qemu = "/nonexistent/qemu-system-x86_64"
            return child

        monkeypatch.setattr(fork_module, "_child", second_fails)
        with pytest.raises(HostError, match="is not installed"):
            await parent.fork(2)
        assert [c.state.value for c in made] == ["stopped", "failed"]
        monkeypatch.undo()
        assert qemu_pids() == pids and runtime_dirs() == dirs and not _fork_leftovers()
        assert await sh(parent, "cat /home/user/kept") == "kept\n"


async def test_a_cancelled_fork_leaves_no_trace(
    no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while one child runs and the other still starts: both are stopped."""
    async with running(VMSpec(memory_mib=256)) as parent:
        pids, dirs = qemu_pids(), runtime_dirs()
        real_child = fork_module._child
        made: list[Machine] = []

        def second_hangs(*args: object) -> Machine:
            child = real_child(*args)  # type: ignore[arg-type]
            made.append(child)
            if len(made) == 2:

                async def hang() -> None:
                    await asyncio.sleep(3600)

                child.launch = hang  # type: ignore[method-assign]
            return child

        monkeypatch.setattr(fork_module, "_child", second_hangs)
        forking = asyncio.create_task(parent.fork(2))
        while not made or made[0].state.value != "running":
            assert not forking.done()
            await asyncio.sleep(0.01)
        forking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forking
        assert made[0].state.value == "stopped"
        assert qemu_pids() == pids and runtime_dirs() == dirs and not _fork_leftovers()
        assert await sh(parent, "echo on") == "on\n"


async def test_a_fork_whose_capture_fails_leaves_no_trace(
    no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The children's QEMUs start while their parent is captured; a capture that fails
    then stops them, and the parent runs on (its device state's save fails here, after both
    children's QEMUs were seen running)."""
    async with running(VMSpec(memory_mib=256)) as parent:
        pids, dirs = qemu_pids(), runtime_dirs()
        seen: list[int] = []

        async def save_fails(qmp: object, fd: int, what: str) -> None:
            deadline = time.monotonic() + 30
            while len(qemu_pids() - pids) < 2:
                assert time.monotonic() < deadline, "the children's QEMUs did not start"
                await asyncio.sleep(0.01)
            seen.append(len(qemu_pids() - pids))
            raise VMError(f"{what} failed: injected")

        monkeypatch.setattr(fork_module, "save_device_state", save_fails)
        with pytest.raises(VMError, match="injected"):
            await parent.fork(2)
        monkeypatch.undo()
        assert seen == [2]
        assert qemu_pids() == pids and runtime_dirs() == dirs and not _fork_leftovers()
        assert await sh(parent, "echo on") == "on\n"
        [child] = await parent.fork(1)  # and it can still be forked
        try:
            assert await sh(child, "echo child") == "child\n"
        finally:
            await child.shutdown()


async def test_a_clone_can_be_forked_and_saved(no_leaks: None) -> None:
    """A clone's RAM is private copy-on-write memory over its template's: it is copied as the
    template's with the clone's own pages on top (``memfd.copy_qemu_ram``). A fork child (a
    clone) writes a file, and its own fork child sees it; it can be saved as a template
    (tests/integration/test_templates.py clones templates saved from clones)."""
    async with running(VMSpec(memory_mib=256)) as parent:
        [child] = await parent.fork(1)
        try:
            assert child.booted_from == "template"
            await sh(child, "echo from-the-child > /home/user/c")
            [grandchild] = await child.fork(1)
            try:
                assert await sh(grandchild, "cat /home/user/c") == "from-the-child\n"
            finally:
                await grandchild.shutdown()
            store = ForkStore(Paths.from_env())
            await child.save_template("from-a-clone", keep_running=True, store=store)
            assert store.exists("from-a-clone")
            store.remove("from-a-clone")
            assert not _fork_leftovers()
            assert await sh(child, "echo on") == "on\n"
        finally:
            await child.shutdown()


def test_sandbox_fork(no_leaks: None) -> None:
    """The SDK's fork (embedded): children are sandboxes of their own."""
    with Sandbox.create(memory_mib=256) as sbx:
        sbx.files.write("/home/user/note", "from the parent")
        children = sbx.fork(2)
        try:
            assert [c.files.read("/home/user/note") for c in children] == ["from the parent"] * 2
            assert len({sbx.id, *(c.id for c in children)}) == 3
            children[0].files.write("/home/user/note", "changed")
            assert children[1].files.read("/home/user/note") == "from the parent"
            assert sbx.files.read("/home/user/note") == "from the parent"
            [grandchild] = children[0].fork()  # a clone forks too
            try:
                assert grandchild.files.read("/home/user/note") == "changed"
            finally:
                grandchild.kill()
        finally:
            for child in children:
                child.kill()
        assert sbx.commands.run("echo on").stdout == "on\n"
