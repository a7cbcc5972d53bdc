"""Sealed templates, against real VMs: a tampered or mismatched template never runs, the RAM
its clones map cannot be written, and a jailed clone sees only its own process in /proc.

One template is made per module; each test works on a copy of it under a new name (its own
directory, so this process's cache of verified RAM, which is keyed by directory and seal, never
hides a change), tampered with on disk as someone who can write the template store but does
not hold the host key would, or re-sealed with the host key as only root could.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import mmap
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_pids, runtime_dirs
from warden._errors import TemplateRefusedError
from warden.config import Paths
from warden.seal import Sealer
from warden.vmm import memfd, templates
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.templates import META_FILE, RAM_FILE, SEAL_PURPOSE, STATE_FILE, Templates

pytestmark = pytest.mark.vm

MEMORY = 256


def _store() -> Templates:
    return Templates(Paths.from_env())


async def _make(name: str) -> None:
    machine = Machine(VMSpec(memory_mib=MEMORY))
    await machine.launch()
    try:
        await machine.agent.exec(["sh", "-c", "echo sealed > /home/user/mark"])
        await machine.save_template(name, keep_running=False)
    finally:
        await machine.shutdown()


@pytest.fixture(scope="module")
def pristine() -> Iterator[str]:
    """A template made for these tests (removed at the end)."""
    name = f"seal-{secrets.token_hex(4)}"
    asyncio.run(_make(name))
    yield name
    _store().remove(name)


@pytest.fixture
def copy(pristine: str) -> Iterator[str]:
    """A copy of the pristine template under a new name, removed after the test."""
    store = _store()
    name = f"copy-{secrets.token_hex(4)}"
    source, target = store.path(pristine), store.path(name)
    target.mkdir(mode=0o700)
    for part in (RAM_FILE, STATE_FILE, META_FILE):
        # cp keeps memory.ram's holes (shutil.copyfile would fill them in).
        subprocess.run(["cp", "--sparse=always", source / part, target / part], check=True)
    secret = store.keys.template(pristine)
    assert secret is not None
    store.keys.save_template(name, secret)
    yield name
    if target.exists():
        store.remove(name)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


def _data_byte(path: Path) -> int:
    """An offset in the first chunk of ``path`` that holds data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) + 4096 + 17
    finally:
        os.close(fd)


def _hole_byte(path: Path) -> int:
    """An offset in the middle of a hole of ``path`` (a never-touched guest page)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        while hole < size:
            data = _next_data(fd, hole, size)
            if data - hole >= 2 * memfd.CHUNK:
                return hole + memfd.CHUNK // 2
            hole = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.close(fd)
    raise AssertionError(f"{path} has no hole of 2 MiB")


def _next_data(fd: int, offset: int, size: int) -> int:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return size


def _tamper_ram_data(d: Path) -> None:
    _flip_byte(d / RAM_FILE, _data_byte(d / RAM_FILE))


def _tamper_ram_hole(d: Path) -> None:
    offset = _hole_byte(d / RAM_FILE)
    with open(d / RAM_FILE, "r+b") as f:
        f.seek(offset)
        f.write(b"\x01")


def _tamper_state(d: Path) -> None:
    _flip_byte(d / STATE_FILE, (d / STATE_FILE).stat().st_size // 2)


def _tamper_meta(d: Path) -> None:
    meta = json.loads((d / META_FILE).read_text())
    meta["memory_mib"] = 512
    (d / META_FILE).write_text(json.dumps(meta))


def _drop_key(d: Path) -> None:
    _store().keys.forget_template(d.name)


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "ram-data": (_tamper_ram_data, "digest of memory.ram"),
    "ram-hole": (_tamper_ram_hole, "digest of memory.ram"),
    "state": (_tamper_state, "SHA-256 of state.bin"),
    "meta": (_tamper_meta, "seal does not verify"),
    "key": (_drop_key, "channel secret is missing"),
}


async def _refused(name: str, match: str) -> None:
    """Cloning template ``name`` is refused with ``match`` in the message, and nothing is
    started: no QEMU, no runtime dir, no VM key."""
    pids, dirs = qemu_pids(), runtime_dirs()
    machine = Machine(VMSpec(template=name))
    with pytest.raises(TemplateRefusedError, match=match) as info:
        await machine.launch()
    assert "make it again" in str(info.value)
    assert qemu_pids() == pids and runtime_dirs() == dirs
    assert not machine.run.dir.exists()
    assert machine.channel_keys.current(machine.id) is None


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
async def test_a_tampered_template_is_refused(no_leaks: None, copy: str, kind: str) -> None:
    tamper, match = TAMPERINGS[kind]
    tamper(_store().path(copy))
    await _refused(copy, match)


async def test_the_intact_copy_clones(no_leaks: None, copy: str) -> None:
    """The control: the same copy, untampered, clones and runs (so the refusals above are
    the tampering's doing)."""
    machine = Machine(VMSpec(template=copy))
    await machine.launch()
    try:
        result = await machine.agent.exec(["cat", "/home/user/mark"])
        assert result.stdout == b"sealed\n"
    finally:
        await machine.shutdown()


def _reseal(d: Path, change: dict[str, Any]) -> None:
    """Change fields of ``meta.json`` and seal it again with the host key: a valid template
    made for another machine."""
    meta = json.loads((d / META_FILE).read_text())
    meta.update(change)
    sealer = Sealer(Paths.from_env(), SEAL_PURPOSE)
    (d / META_FILE).write_text(json.dumps(sealer.seal(meta)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kernel_sha256": "0" * 64}, "kernel changed"),
        ({"rootfs_sha256": "1" * 64}, "rootfs changed"),
        ({"qemu_version": "QEMU emulator version 6.2.0"}, "QEMU is"),
        ({"machine_key": "f" * 64}, "another machine"),
    ],
)
async def test_a_template_for_another_machine_is_refused(
    no_leaks: None, copy: str, change: dict[str, Any], match: str
) -> None:
    _reseal(_store().path(copy), change)
    await _refused(copy, match)


def test_the_sealed_memfd_refuses_writes(copy: str) -> None:
    store = _store()
    loaded = store.load(copy)
    try:
        fd = loaded.ram_fd
        assert memfd.is_sealed(fd)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 4096)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Nor can it grow or shrink, nor be unsealed.
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, memfd.F_ADD_SEALS, memfd.F_SEAL_WRITE)
        # Its size is the guest's RAM, intact.
        assert os.fstat(fd).st_size == MEMORY << 20
    finally:
        loaded.close()
        store.remove(copy)
    assert loaded.ram_fd == -1  # the loader's fd: closed by it
    assert not any(key[0] == str(store.path(copy)) for key in templates._ram_cache)


async def test_a_jailed_clone_sees_only_its_own_process(no_leaks: None, copy: str) -> None:
    machine = Machine(VMSpec(template=copy))
    await machine.launch()
    try:
        if machine.jail is None or not machine.jail.mount:
            pytest.skip("this host runs QEMU without a mount namespace")
        pid = machine.pid
        assert pid is not None
        mounts = [
            line.split(" - ")
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/proc"
        ]
        assert len(mounts) == 1, mounts
        fstype_and_options = mounts[0][1].split()
        assert fstype_and_options[0] == "proc"
        options = set(fstype_and_options[2].split(","))
        assert {"subset=pid", "hidepid=invisible", "ro"} <= options, options
        entries = set(os.listdir(f"/proc/{pid}/root/proc"))
        assert "sys" not in entries and "kcore" not in entries
        assert {e for e in entries if e.isdigit()} == {"1"}, entries
    finally:
        await machine.shutdown()


# A clone's QEMU starts while its template's RAM is still being copied into the sealed memfd
# (the copy runs in a thread; Machine._connect loads the clone's state only once the memfd is
# sealed and its digest checked). The two tests below hold that copy back.


async def test_a_copy_changed_before_its_seal_is_refused(
    no_leaks: None, copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte that changes in the memfd after the copy and before the seal (as a write by
    whoever held it in that window would) is caught: the digest is computed on the sealed
    memfd itself, not on what was read, so the clone is refused and its QEMU, started
    meanwhile, is gone with everything else."""

    def corrupting(src: int, dst: int, size: int) -> None:
        memfd.copy_sparse(src, dst, size, hashed=False)  # fill_sealed's copy, then a change
        offset = os.lseek(dst, 0, os.SEEK_DATA) + 4096 + 17
        os.pwrite(dst, bytes([os.pread(dst, 1, offset)[0] ^ 0x5A]), offset)
        fcntl.fcntl(dst, memfd.F_ADD_SEALS, memfd.SEALS)

    monkeypatch.setattr(memfd, "fill_sealed", corrupting)
    await _refused(copy, "digest of memory.ram")


async def test_qemu_touches_no_guest_ram_before_its_state_loads(
    no_leaks: None, copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes the early start safe: QEMU, started with ``-incoming defer`` on the memfd
    still being filled, neither reads nor writes a page of it (its mapping has no resident
    page at all, so none was copied-on-write from a half-filled memfd) until warden issues
    ``migrate-incoming``, after the seal and the check. Then the clone runs."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    real = memfd.fill_sealed

    def held_back(src: int, dst: int, size: int) -> None:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=60)
        real(src, dst, size)

    monkeypatch.setattr(memfd, "fill_sealed", held_back)
    machine = Machine(VMSpec(template=copy))
    launch = asyncio.create_task(machine.launch())
    try:
        deadline = loop.time() + 60
        while machine._qmp is None or machine.pid is None:
            assert not launch.done() and loop.time() < deadline, "QEMU never came up"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # QEMU idles in "inmigrate", waiting for its state
        assert not launch.done()
        status = await machine._qmp.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "inmigrate", status
        ram = _clone_ram_mapping(machine.pid)
        assert ram["Rss"] == 0 and ram["Anonymous"] == 0, ram
        release.set()
        await asyncio.wait_for(launch, 60)
        result = await machine.agent.exec(["cat", "/home/user/mark"])
        assert result.stdout == b"sealed\n"
    finally:
        release.set()
        if not launch.done():
            launch.cancel()
        with contextlib.suppress(BaseException):
            await launch
        await machine.shutdown()


def _clone_ram_mapping(pid: int) -> dict[str, int]:
    """The kB fields of QEMU ``pid``'s mapping of its template's memfd (``smaps``)."""
    fields: dict[str, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's first line (an anonymous one has no name)
            if fields is not None:
                break
            name = head[5] if len(head) > 5 else ""
            if name.startswith("/memfd:warden-template-") and int(head[2], 16) == 0:
                size = int(head[0].split("-")[1], 16) - int(head[0].split("-")[0], 16)
                fields = {} if size == MEMORY << 20 else None
        elif fields is not None and line.endswith(" kB"):
            fields[head[0].rstrip(":")] = int(head[1])
    assert fields, f"QEMU {pid} maps no template RAM of {MEMORY} MiB"
    return fields
