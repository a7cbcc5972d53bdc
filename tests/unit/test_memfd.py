"""Guest RAM files (``vmm/memfd.py``): the sparse copy keeps holes, and the hash-list digest
is the same for a hole and for zeros written out, and changes with any byte."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator

import pytest

from warden.vmm import memfd

CHUNK = memfd.CHUNK
SIZE = 8 * CHUNK + 4096  # a last, short chunk too


def _file(pieces: dict[int, bytes], size: int = SIZE) -> int:
    """A memfd of ``size`` bytes, sparse but for ``pieces`` (offset -> bytes)."""
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    for offset, data in pieces.items():
        os.pwrite(fd, data, offset)
    return fd


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _digest(fds: list[int], pieces: dict[int, bytes], size: int = SIZE) -> str:
    src, dst = _file(pieces, size), _file({}, size)
    fds += [src, dst]
    return memfd.copy_sparse(src, dst, size)


def _reference(data: bytes) -> str:
    """The hash list, computed plainly over every chunk."""
    digests = b"".join(
        hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)
    )
    return hashlib.sha256(digests).hexdigest()


def test_holes_and_zeros_have_the_same_digest(fds: list[int]) -> None:
    sparse = _digest(fds, {3 * CHUNK + 5: b"data"})
    zeros_written = _digest(fds, {0: bytes(SIZE), 3 * CHUNK + 5: b"data"})
    assert sparse == zeros_written
    expected = bytearray(SIZE)
    expected[3 * CHUNK + 5 : 3 * CHUNK + 9] = b"data"
    assert sparse == _reference(bytes(expected))


@pytest.mark.parametrize("offset", [0, 3 * CHUNK + 6, 5 * CHUNK, SIZE - 1])
def test_one_changed_byte_changes_the_digest(fds: list[int], offset: int) -> None:
    base = {3 * CHUNK + 5: b"data"}
    changed = dict(base)
    if offset == 3 * CHUNK + 6:  # inside the data
        changed[3 * CHUNK + 5] = b"dbta"
    else:  # in a hole
        changed[offset] = b"\x01"
    assert _digest(fds, base) != _digest(fds, changed)


def test_the_copy_is_exact_and_keeps_holes(fds: list[int]) -> None:
    pieces = {CHUNK + 7: os.urandom(100), 6 * CHUNK: os.urandom(CHUNK + 10), 0: bytes(CHUNK)}
    src = _file(pieces)
    dst = _file({})
    fds += [src, dst]
    digest = memfd.copy_sparse(src, dst, SIZE)
    assert os.pread(dst, SIZE, 0) == os.pread(src, SIZE, 0)
    assert digest == _reference(os.pread(src, SIZE, 0))
    # Only the chunks with non-zero data were written: 1, 6 and 7 (zeros at 0 were not).
    assert os.fstat(dst).st_blocks * 512 == 3 * CHUNK


def test_ram_digest_of_an_empty_file() -> None:
    assert memfd.RamDigest().hexdigest() == hashlib.sha256().hexdigest()


def test_a_sealed_copy_refuses_writes(fds: list[int]) -> None:
    src = _file({CHUNK: b"guest"})
    fds.append(src)
    sealed, digest = memfd.sealed_copy(src, SIZE, "test-sealed")
    fds.append(sealed)
    assert memfd.is_sealed(sealed)
    assert digest == _digest(fds, {CHUNK: b"guest"})
    assert os.pread(sealed, 5, CHUNK) == b"guest"
    with pytest.raises(PermissionError):
        os.pwrite(sealed, b"x", 0)
    with pytest.raises(PermissionError):
        fcntl.fcntl(sealed, memfd.F_ADD_SEALS, 0)
    assert not memfd.is_sealed(src)


def test_an_unhashed_copy_is_the_same_copy(fds: list[int]) -> None:
    src = _file({2 * CHUNK + 3: b"fork", 5 * CHUNK: os.urandom(CHUNK)})
    fds.append(src)
    sealed, digest = memfd.sealed_copy(src, SIZE, "test-unhashed", hashed=False)
    fds.append(sealed)
    assert digest == "" and memfd.is_sealed(sealed)
    assert os.pread(sealed, SIZE, 0) == os.pread(src, SIZE, 0)
    assert os.fstat(sealed).st_blocks * 512 == 2 * CHUNK


def test_a_filled_memfd_is_the_file_sealed_with_its_holes(fds: list[int]) -> None:
    """``fill_sealed`` (a template's load) copies runs of data chunks, holes left as holes;
    ``ram_digest`` of the sealed copy is the digest ``copy_sparse`` gave the same bytes."""
    pieces = {
        CHUNK + 7: os.urandom(100),
        2 * CHUNK: os.urandom(CHUNK),
        5 * CHUNK: os.urandom(3 * CHUNK + 10),  # a run of data up to the short last chunk
    }
    src = _file(pieces)
    dst = os.memfd_create("test-fill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fds += [src, dst]
    os.ftruncate(dst, SIZE)
    memfd.fill_sealed(src, dst, SIZE)
    assert memfd.is_sealed(dst)
    assert os.pread(dst, SIZE, 0) == os.pread(src, SIZE, 0)
    # Whole chunks that hold data (1, 2, 5, 6, 7 and the short last one); 0, 3 and 4 not.
    assert os.fstat(dst).st_blocks * 512 == 5 * CHUNK + 4096
    assert memfd.ram_digest(dst, SIZE) == _digest(fds, pieces)
    assert memfd.ram_digest(dst, SIZE) == _reference(os.pread(src, SIZE, 0))


def test_ram_digest_sees_a_changed_byte(fds: list[int]) -> None:
    src = _file({3 * CHUNK: b"data"})
    fds.append(src)
    before = memfd.ram_digest(src, SIZE)
    os.pwrite(src, b"\x01", 6 * CHUNK + 9)  # in what was a hole
    assert memfd.ram_digest(src, SIZE) != before
