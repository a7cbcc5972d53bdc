"""A paused VM's saved state is sealed: a tampered or re-sealed-for-another-VM file is refused
before QEMU reads a byte, with a clear error, and the VM stays paused (removable)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from warden._errors import PausedStateError, VMError
from warden.seal import Sealer
from warden.vmm import pause as pause_module
from warden.vmm.machine import Machine
from warden.vmm.pause import SEAL_PURPOSE, PausedStates
from warden.vmm.snapshot import META_FILE
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

pytestmark = pytest.mark.vm


def _flip_byte(path: os.PathLike[str], offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_tampered_pause_file_is_refused(no_leaks: None) -> None:
    async def main() -> None:
        machine = Machine(VMSpec.parse())
        await machine.launch()
        try:
            await machine.pause()
            states = PausedStates(machine.paths)
            state = states.path(machine.id)
            size = state.stat().st_size
            _flip_byte(state, size // 2)  # guest memory
            with pytest.raises(PausedStateError, match=r"SHA-256 .* not the sealed one"):
                await machine.resume()
            assert machine.state is VMState.PAUSED and machine.pid is None
            _flip_byte(state, size // 2)  # undone: the original bytes verify again

            # A record that claims another VM, sealed with the host key: the id is bound.
            meta_path = state.parent / META_FILE
            original = meta_path.read_bytes()
            meta = json.loads(original)
            meta["vm_id"] = "0123456789ab"
            sealer = Sealer(machine.paths, SEAL_PURPOSE)
            meta_path.write_text(json.dumps(sealer.seal(meta)))
            with pytest.raises(PausedStateError, match="another machine"):
                await machine.resume()

            # Paused by a warden that built another QEMU command line (an older version): the
            # message says why, not only that it was refused.
            meta = json.loads(original)
            meta["key"] = "0" * 24
            meta_path.write_text(json.dumps(sealer.seal(meta)))
            with pytest.raises(PausedStateError, match=r"command line .* not the one"):
                await machine.resume()

            # A record whose seal does not verify (changed without the key).
            meta = json.loads(original)
            meta["memory_mib"] = 512
            meta_path.write_text(json.dumps(meta))
            with pytest.raises(PausedStateError, match="refused"):
                await machine.resume()
            assert machine.state is VMState.PAUSED

            meta_path.write_bytes(original)  # the genuine record: it resumes
            await machine.resume()
            assert (await machine.agent.exec(["echo", "ok"])).stdout == b"ok\n"
        finally:
            await machine.shutdown()

    asyncio.run(main())


def test_a_stream_past_its_bound_fails_the_pause_and_the_vm_runs_on(
    no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU (taken over by its guest) that streams more than RAM + margin does not fill the
    disk: the pause fails, nothing is kept, and the VM carries on with a new session."""
    monkeypatch.setattr(pause_module, "STREAM_MARGIN", -(200 << 20))  # 256 MiB -> 56 MiB

    async def main() -> None:
        machine = Machine(VMSpec.parse())
        await machine.launch()
        try:
            await machine.agent.write_file("/home/user/f", b"still here")
            with pytest.raises(VMError, match="migration stream passed"):
                await machine.pause()
            assert machine.state is VMState.RUNNING
            assert not (machine.paths.paused / machine.id / "state.bin").exists()
            assert not list((machine.paths.paused / machine.id).glob(".*.tmp"))
            assert await machine.agent.read_file_bytes("/home/user/f") == b"still here"
        finally:
            await machine.shutdown()

    asyncio.run(main())
