"""The console log keeps at most its cap on disk, in two halves, and always the newest output."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.vmm.console import ConsoleLog, pump


@settings(max_examples=50, deadline=None)
@given(
    cap=st.integers(min_value=2, max_value=4096),
    writes=st.lists(st.binary(min_size=0, max_size=3000), max_size=30),
)
def test_never_more_than_the_cap_and_the_newest_bytes_kept(
    tmp_path_factory: pytest.TempPathFactory, cap: int, writes: list[bytes]
) -> None:
    path = tmp_path_factory.mktemp("console") / "console.log"
    log = ConsoleLog(path, cap)
    for data in writes:
        log.write(data)
    log.close()
    sizes = [p.stat().st_size for p in (log.old, path) if p.exists()]
    assert all(size <= cap // 2 for size in sizes)
    assert sum(sizes) <= cap
    kept = (log.old.read_bytes() if log.old.exists() else b"") + (
        path.read_bytes() if path.exists() else b""
    )
    everything = b"".join(writes)
    assert everything.endswith(kept)
    # At least the last half cap of output survives a rotation.
    assert len(kept) >= min(len(everything), cap // 2)


def test_files_are_private_and_a_reopened_log_appends(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    first = ConsoleLog(path, 100)
    first.write(b"a" * 30)
    first.close()
    second = ConsoleLog(path, 100)  # a new manager of the same VM
    second.write(b"b" * 30)  # 60 > 50: the first 20 b go on, then it rotates
    second.close()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert second.old.read_bytes() == b"a" * 30 + b"b" * 20
    assert path.read_bytes() == b"b" * 10


def test_tail_spans_both_halves(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", 40)
    log.write(b"one\r\ntwo\r\nthree\r\nfour\r\nfive\r\nsix\r\n")  # 33 bytes: rotates at 20
    log.close()
    assert log.old.exists()
    assert log.tail(3) == "four\nfive\nsix"
    assert log.tail(0) == ""
    assert ConsoleLog(tmp_path / "none.log").tail(5) == ""


async def test_pump_copies_until_eof(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", 1 << 20)

    async def serve(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello\n" * 1000)
        await w.drain()
        w.close()

    sock = tmp_path / "c.sock"
    server = await asyncio.start_unix_server(serve, str(sock))
    async with server:
        stream = await asyncio.open_unix_connection(str(sock))
        await asyncio.wait_for(pump(stream, log), 10)
    assert (tmp_path / "console.log").read_bytes() == b"hello\n" * 1000


def test_a_tiny_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ConsoleLog(tmp_path / "c.log", 1)
