"""The guest agent's frame writer: large frames staged in a pipe and spliced, small ones written,
and the plain fallback where the fd refuses splice. Bytes must come out whole and in order."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.guest.writer import STAGE_MIN, STAGE_SIZE, Writer


def pattern(size: int, seed: int) -> bytes:
    """Bytes that differ by position, so a lost, doubled or swapped piece shows."""
    block = bytes((seed + i * 7) % 251 for i in range(4099))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def drain(sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(1 << 20)
        assert chunk, "the writer's side closed early"
        got += chunk
    return bytes(got)


def test_frames_of_every_size_arrive_whole_and_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    near, far = pair
    w = Writer(near.fileno(), threading.Lock(), poll_first=True)
    # Written, staged in one splice, and (past STAGE_SIZE) staged in several rounds.
    sizes = [0, 5, STAGE_MIN, STAGE_MIN + 1, 256 * 1024, STAGE_SIZE + 12345, 1 << 20]
    frames = [(pattern(12, n), pattern(n, n + 1)) for n in sizes]
    expected = b"".join(h + p for h, p in frames)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(drain(far, len(expected))))
    reader.start()
    for header, payload in frames:
        assert w.send(header, payload)
    reader.join(30)
    assert got == [expected]
    assert w._can_stage and w._stage is not None  # the large frames were spliced
    w.close()
    assert w._stage is None
    assert not w.send(b"late")


def test_an_fd_that_refuses_splice_gets_plain_writes(tmp_path: Path) -> None:
    """splice(2) refuses a file opened O_APPEND (EINVAL): the frame is still sent, whole."""
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        w = Writer(fd, threading.Lock(), poll_first=False)
        first, second = pattern(400_000, 1), pattern(300_000, 2)
        assert w.send(b"header-one..", first)
        assert not w._can_stage
        assert w.send(b"header-two..", second)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"header-one.." + first + b"header-two.." + second


def test_a_host_that_goes_away_kills_the_writer_and_frees_its_pipe(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    near, far = pair
    w = Writer(near.fileno(), threading.Lock(), poll_first=True)
    assert w.send(b"h" * 12, pattern(100_000, 3))
    stage = w._stage
    assert stage is not None
    far.close()
    while w.send(b"h" * 12, pattern(100_000, 4)):  # the socket's buffer may take one more
        pass
    assert w.dead
    assert w._stage is None
    for fd in stage:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_pipe_is_freed_when_a_dead_writer_is_dropped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """close() cannot take the lock while a sender holds it: the pipe goes with the writer."""
    near, _far = pair
    lock = threading.Lock()
    w = Writer(near.fileno(), lock, poll_first=True)
    assert w._staging()
    stage = w._stage
    assert stage is not None
    with lock:  # a sender blocked in the port
        w.close()
        assert w.dead and w._stage is not None
    del w
    for fd in stage:
        with pytest.raises(OSError):
            os.fstat(fd)
