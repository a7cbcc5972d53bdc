"""The idle gate (``vmm/idle.py``) with fake stop/cont: no request sees a stopped VM, none is
lost during a stop, and a pause is refused while requests are in flight."""

from __future__ import annotations

import asyncio

import pytest

from warden._errors import StateTransitionError
from warden.vmm.idle import IdleGate


class FakeVM:
    def __init__(self, stop_s: float = 0.0) -> None:
        self.running = True
        self.stop_s = stop_s
        self.log: list[str] = []

    async def stop(self) -> None:
        await asyncio.sleep(self.stop_s)
        self.running = False
        self.log.append("stop")

    async def cont(self) -> None:
        self.running = True
        self.log.append("cont")


async def _request(gate: IdleGate, vm: FakeVM) -> bool:
    await gate.enter()
    try:
        return vm.running
    finally:
        gate.leave()


def test_an_idle_vm_is_stopped_and_the_next_request_continues_it() -> None:
    async def main() -> None:
        vm, gate = FakeVM(), IdleGate("t", 0.05)
        gate.bind(vm.stop, vm.cont)
        await asyncio.sleep(0.15)
        assert gate.stopped and not vm.running
        assert await _request(gate, vm), "a request saw a stopped VM"
        assert vm.log == ["stop", "cont"]
        await asyncio.sleep(0.15)
        assert vm.log == ["stop", "cont", "stop"]
        gate.unbind()

    asyncio.run(main())


def test_a_request_during_the_stop_waits_and_continues() -> None:
    async def main() -> None:
        vm, gate = FakeVM(stop_s=0.1), IdleGate("t", 0.01)
        gate.bind(vm.stop, vm.cont)
        await asyncio.sleep(0.05)  # the stop is under way
        assert not gate.stopped and vm.running
        seen = await asyncio.gather(*(_request(gate, vm) for _ in range(3)))
        assert seen == [True, True, True]
        assert vm.log == ["stop", "cont"]
        gate.unbind()

    asyncio.run(main())


def test_no_stop_while_a_request_is_in_flight() -> None:
    async def main() -> None:
        vm, gate = FakeVM(), IdleGate("t", 0.02)
        gate.bind(vm.stop, vm.cont)
        await gate.enter()
        await asyncio.sleep(0.1)
        assert vm.log == [] and vm.running
        with pytest.raises(StateTransitionError, match=r"in flight.*open link"):
            async with gate.exclusive("pausing"):
                pass
        gate.leave()
        async with gate.exclusive("being paused"):
            with pytest.raises(StateTransitionError, match="being paused"):
                await asyncio.wait_for(gate.enter(), 1.0)
        assert gate.inflight == 0
        gate.unbind()

    asyncio.run(main())


def test_off_by_default() -> None:
    async def main() -> None:
        vm, gate = FakeVM(), IdleGate("t")
        gate.bind(vm.stop, vm.cont)
        await asyncio.sleep(0.05)
        assert vm.log == [] and gate.idle_s is None

    asyncio.run(main())
