"""File reads through the transfer window (guest -> host) on a real VM (embedded SDK).

The agent writes the pieces of a file into slots of the window that the host lent to the read
and sends tagged references; the host checks each before a byte is handed on. These tests
count the pieces the host took from the window (so a read that silently fell back to the
stream fails them), check the bytes of files around the slot size, empty and sparse files,
reads and writes interleaved and concurrent in one session, a download to disk, and a piece
altered in the window file (by someone who can write it) refused. tests/unit/
test_window_reads.py covers the forged references of a hostile agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden import AsyncSandbox, Sandbox
from warden._errors import ChannelAuthError, WardenError
from warden.agent import xferread
from warden.agent.client import AgentClient
from warden.config import Paths
from warden.vmm.argv import XFER_SLOT_SIZE, XFER_SLOTS
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import Templates

pytestmark = pytest.mark.vm

SLOT = XFER_SLOT_SIZE


@pytest.fixture(scope="module")
def sbx() -> Iterator[Sandbox]:
    with Sandbox.create(memory_mib=512) as sandbox:
        yield sandbox


@pytest.fixture
def pieces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the pieces the host takes from the window, as it takes them."""
    taken: list[int] = []
    take = xferread.ReadSlots.take

    def counting(self: xferread.ReadSlots, fd: int, rid: int, offset: int, who: str) -> bytes:
        data = take(self, fd, rid, offset, who)
        taken.append(len(data))
        return data

    monkeypatch.setattr(xferread.ReadSlots, "take", counting)
    return taken


def guest_sha(sbx: Sandbox, path: str) -> str:
    return sbx.commands.run(["sha256sum", path], timeout=120).stdout.split()[0]


@pytest.mark.parametrize(
    "size",
    [0, 1, (64 << 10) - 1, 64 << 10, SLOT - 1, SLOT, SLOT + 1, 5 * SLOT + 4097, 20 * SLOT],
)
def test_a_round_trip_of_random_bytes(sbx: Sandbox, pieces: list[int], size: int) -> None:
    data = os.urandom(size)
    assert sbx.files.write("/home/user/r.bin", data) == size
    assert guest_sha(sbx, "/home/user/r.bin") == hashlib.sha256(data).hexdigest()
    pieces.clear()
    assert sbx.files.read("/home/user/r.bin", format="bytes") == data
    # Pieces of 64 KiB or more go through the window; a shorter tail goes inline.
    tail = size % SLOT
    assert sum(pieces) == (size - tail if tail < 64 << 10 else size)
    assert all(length <= SLOT for length in pieces)


def test_a_sparse_file(sbx: Sandbox, pieces: list[int]) -> None:
    """A 12 MiB file with two small islands of data in its holes reads back exactly."""
    script = (
        "truncate -s 12M /home/user/sparse && "
        "printf island-one | dd of=/home/user/sparse bs=1 seek=3000000 conv=notrunc 2>/dev/null"
        " && printf island-two | dd of=/home/user/sparse bs=1 seek=9437183 conv=notrunc "
        "2>/dev/null"
    )
    assert sbx.commands.run(script, timeout=60).exit_code == 0
    expected = bytearray(12 << 20)
    expected[3000000 : 3000000 + 10] = b"island-one"
    expected[9437183 : 9437183 + 10] = b"island-two"
    pieces.clear()
    assert sbx.files.read("/home/user/sparse", format="bytes") == bytes(expected)
    assert sum(pieces) == 12 << 20


def test_a_download_to_disk(sbx: Sandbox, pieces: list[int], tmp_path: Path) -> None:
    make = "head -c 7340033 /dev/urandom > /home/user/dl.bin"
    assert sbx.commands.run(make, timeout=60).exit_code == 0
    pieces.clear()
    dest = tmp_path / "dl.bin"
    assert sbx.files.download("/home/user/dl.bin", dest) == 7340033
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == guest_sha(sbx, "/home/user/dl.bin")
    assert sum(pieces) == 7 * SLOT  # and the last byte inline


def test_reads_and_writes_interleave_in_one_session(sbx: Sandbox, pieces: list[int]) -> None:
    """Pieces in each direction are numbered per session: several of each, alternating."""
    for size in (3 * SLOT, 2 * SLOT + 17, 6 * SLOT + 4096):
        data = os.urandom(size)
        assert sbx.files.write("/home/user/i.bin", data) == size
        assert sbx.files.read("/home/user/i.bin", format="bytes") == data
    assert len(pieces) >= 11


def test_concurrent_reads_and_a_write(pieces: list[int]) -> None:
    """Two reads and a write at once: the agent numbers the pieces of both reads in the
    order their references leave, and the slots are shared without a mix-up."""

    async def main() -> None:
        async with await AsyncSandbox.create(memory_mib=512) as sbx:
            one, two, three = os.urandom(9 * SLOT + 5), os.urandom(7 * SLOT), os.urandom(5 * SLOT)
            await sbx.files.write("/home/user/1.bin", one)
            await sbx.files.write("/home/user/2.bin", two)
            got_one, got_two, written = await asyncio.gather(
                sbx.files.read("/home/user/1.bin", format="bytes"),
                sbx.files.read("/home/user/2.bin", format="bytes"),
                sbx.files.write("/home/user/3.bin", three),
            )
            assert (got_one, got_two, written) == (one, two, len(three))
            assert await sbx.files.read("/home/user/3.bin", format="bytes") == three

    asyncio.run(main())
    assert sum(pieces) == 9 * SLOT + 7 * SLOT + 5 * SLOT


def test_clones_of_a_template_read_through_their_own_windows(pieces: list[int]) -> None:
    """The agent's window disk and its state come from the template's memory; each clone has
    a window file of its own, and a session key of its own, and reads through it."""
    name = f"t-reads-{os.getpid()}"
    try:
        data = os.urandom(3 * SLOT + 70000)
        with Sandbox.create(memory_mib=256) as src:
            src.files.write("/home/user/t.bin", data)
            src.save_template(name)
        with Sandbox.create(template=name) as a, Sandbox.create(template=name) as b:
            for clone in (a, b):
                pieces.clear()
                assert clone.files.read("/home/user/t.bin", format="bytes") == data
                assert sum(pieces) == len(data)
                fresh = os.urandom(2 * SLOT)
                clone.files.write("/home/user/c.bin", fresh)
                assert clone.files.read("/home/user/c.bin", format="bytes") == fresh
    finally:
        store = Templates(Paths.from_env())
        if store.exists(name):
            store.remove(name)


def test_an_altered_piece_is_refused_and_a_new_session_works(
    sbx: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write the window file (root's on the host, the VM uid's in its jail)
    flips a bit of a piece after the agent wrote it: the read fails before any byte of that
    piece is handed on; the next session reads again."""
    data = os.urandom(4 * SLOT)
    sbx.files.write("/home/user/a.bin", data)
    take = xferread.ReadSlots.take
    altered: list[int] = []

    def alter_then_take(
        self: xferread.ReadSlots, fd: int, rid: int, offset: int, who: str
    ) -> bytes:
        if len(altered) == 1:  # the second piece
            byte = os.pread(fd, 1, offset + 4242)
            os.pwrite(fd, bytes([byte[0] ^ 0x10]), offset + 4242)
        altered.append(offset)
        return take(self, fd, rid, offset, who)

    monkeypatch.setattr(xferread.ReadSlots, "take", alter_then_take)
    got: list[bytes] = []
    with pytest.raises(ChannelAuthError, match="failed authentication"):
        for chunk in sbx.files.stream("/home/user/a.bin"):
            got.append(chunk)
    assert got == [data[:SLOT]]
    monkeypatch.undo()
    deadline = time.monotonic() + 60  # the manager opens a new session
    while True:
        try:
            assert sbx.files.read("/home/user/a.bin", format="bytes") == data
            break
        except WardenError:
            assert time.monotonic() < deadline, "no new session"
            time.sleep(0.2)


async def test_a_new_host_takes_over_an_agent_left_mid_read(no_leaks: None) -> None:
    """The host dies in the middle of a read through the window (a manager killed with -9):
    the agent's read is cancelled with its session, and the new session answers its HELLO only
    once no write of the old read into the window is in progress. The new host's reads and
    writes through the same slots then arrive intact, every time."""
    machine = Machine(VMSpec(memory_mib=512))
    await machine.launch()
    try:
        await machine.agent.close()
        secret = machine.channel_keys.current(machine.id)
        make = "head -c 48M /dev/urandom > /home/user/big"
        client = await AgentClient.connect_unix(machine.run.agent, timeout=20, secret=secret)
        assert (await client.exec(["sh", "-c", make])).exit_code == 0
        for _ in range(3):
            client.enable_xfer(machine.run.xfer, slots=XFER_SLOTS, slot_size=XFER_SLOT_SIZE)
            chunks = client.read_file("/home/user/big")
            assert len(await anext(chunks)) == SLOT  # the agent now fills the other slots
            client._writer.transport.abort()  # the host dies without a goodbye
            with pytest.raises(WardenError):
                async for _ in chunks:
                    pass
            client = await AgentClient.connect_unix(
                machine.run.agent, timeout=20, resync=True, secret=secret
            )
            client.enable_xfer(machine.run.xfer, slots=XFER_SLOTS, slot_size=XFER_SLOT_SIZE)
            data = os.urandom(9 * SLOT + 3)
            for _ in range(2):
                assert await client.write_file("/home/user/w.bin", data) == len(data)
                assert await client.read_file_bytes("/home/user/w.bin") == data
        await client.close()
    finally:
        await machine.shutdown()
