"""Copying out of a guest onto the host disk (``sdk/_download.py``), with a fake chunk source
instead of a guest (the VM tests in tests/security/test_sparse_copy.py use a real one): the
size limit, holes for zero runs, and nothing left behind on failure or cancellation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from warden import SizeLimitError
from warden.sdk import _download

MIB = 1 << 20


async def _chunks(*parts: bytes, then: BaseException | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(0)
    if then is not None:
        raise then


async def test_zero_runs_become_holes_and_the_content_is_exact(tmp_path: Path) -> None:
    data = b"head" + bytes(8 * MIB) + b"tail" + bytes(3 * MIB)  # ends in a hole
    dest = tmp_path / "out"
    size = await _download.download(
        _chunks(data[: 5 * MIB], data[5 * MIB :]), "/f", str(dest), None
    )
    assert size == len(data)
    assert dest.read_bytes() == data
    assert dest.stat().st_blocks * 512 < 1 * MIB  # 11 MiB of zeros took no disk
    assert dest.stat().st_mode & 0o777 == 0o600


async def test_a_file_past_max_size_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(SizeLimitError, match="max_size=1000"):
        await _download.download(_chunks(b"x" * 600, b"y" * 600), "/f", str(dest), 1000)
    assert os.listdir(tmp_path) == []
    # exactly at the limit is fine
    assert await _download.download(_chunks(b"x" * 1000), "/f", str(dest), 1000) == 1000


async def test_a_failure_or_cancellation_leaves_nothing_and_keeps_the_old_file(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "out"
    dest.write_bytes(b"old")
    with pytest.raises(OSError, match="broke"):
        await _download.download(_chunks(b"new", then=OSError("broke")), "/f", str(dest), None)
    assert os.listdir(tmp_path) == ["out"]
    assert dest.read_bytes() == b"old"

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65536
            await asyncio.sleep(0.001)

    task = asyncio.create_task(_download.download(endless(), "/f", str(dest), None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(tmp_path) == ["out"]
    assert dest.read_bytes() == b"old"
    # and a complete one replaces it
    await _download.download(_chunks(b"new"), "/f", str(dest), None)
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out"]
