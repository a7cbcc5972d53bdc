"""Session versions and WINDOW flow control of the guest agent, frame by frame.

The agent runs on the host on a socketpair (no VM needed for the wire behaviour); the raw host
of ``guest_raw`` speaks to it without the client, so each test sees exactly what the agent
sends and when.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.guest_raw import RawHost, pipe_blocked, user_home
from warden.wire.frame import (
    HEADER,
    INITIAL_WINDOW,
    SESSION_VERSION,
    Channel,
    FrameType,
    decode_json,
    encode_header,
)
from warden.wire.ops import ErrorKind

MIB = 1 << 20


@pytest.fixture
def home() -> Iterator[Path]:
    with user_home() as path:
        yield path


@pytest.fixture
def host(tmp_path: Path, home: Path) -> Iterator[RawHost]:
    raw = RawHost(tmp_path / "agent.log", home)
    try:
        yield raw
    finally:
        code = raw.close()
        assert "Traceback" not in raw.output(), raw.output()
        assert code == 0, raw.output()


def take_stream(host: RawHost, rid: int, channel: Channel, limit: int) -> tuple[int, bytes]:
    """Read DATA of ``channel`` until ``limit`` bytes came; (bytes seen, other streams)."""
    seen, other = 0, b""
    while seen < limit:
        frame = host.recv()
        assert frame.request_id == rid and frame.type in (FrameType.DATA, FrameType.EOF), frame
        if frame.type == FrameType.EOF:
            assert frame.channel != channel, "the stream ended early"
        elif frame.channel == channel:
            seen += len(frame.payload)
        else:
            other += frame.payload
    return seen, other


def assert_quiet(host: RawHost, seconds: float) -> None:
    """Nothing arrives for ``seconds``."""
    with pytest.raises(TimeoutError):
        frame = host.recv(timeout=seconds)
        pytest.fail(f"the agent sent {frame} beyond its credit")


def test_the_agent_speaks_session_version_2(host: RawHost) -> None:
    assert host.hello([1, 2, 3])["version"] == SESSION_VERSION == 2
    assert host.hello([SESSION_VERSION])["version"] == 2  # a new HELLO, a new session
    host.send(b"")
    host.request(1, {"op": "ping"})
    assert decode_json(host.recv())["ok"] is True


@pytest.mark.parametrize("offer", [b"[99]", b"[1]", b"2"])  # 1: the agents of older images
def test_no_common_version_is_refused(host: RawHost, offer: bytes) -> None:
    payload = b'{"versions":' + offer + b"}"
    host.send(encode_header(FrameType.HELLO, 0, Channel.CONTROL, len(payload)) + payload)
    error = host.recv()
    assert error.type == FrameType.ERROR
    assert "no common protocol version" in decode_json(error)["message"]
    assert host.hello([SESSION_VERSION])["version"] == SESSION_VERSION  # the next HELLO works


def test_exec_output_stops_at_the_credit_and_the_process_blocks(host: RawHost) -> None:
    host.hello([1, 2])
    host.request(1, {"op": "exec", "shell": "echo $$ >&2; exec head -c 5000000 /dev/zero"})
    seen, stderr = take_stream(host, 1, Channel.STDOUT, INITIAL_WINDOW)
    assert seen == INITIAL_WINDOW  # never a byte beyond the credit
    assert_quiet(host, 1.5)
    pid = int(stderr.split()[0])
    assert pipe_blocked(pid), "the command should wait on its full stdout pipe"
    host.window(1, Channel.STDOUT, 2 * MIB)
    more, _ = take_stream(host, 1, Channel.STDOUT, 2 * MIB)
    assert more == 2 * MIB
    assert_quiet(host, 0.5)
    host.window(1, Channel.STDOUT, 4 * MIB)
    streams, response = host.response(1)
    assert response == {"ok": True, "exit_code": 0, "signal": None, "timed_out": False}
    assert seen + more + len(streams.get("stdout", b"")) == 5_000_000


def test_stderr_has_its_own_credit(host: RawHost) -> None:
    host.hello([2])
    host.request(1, {"op": "exec", "shell": "head -c 3000000 /dev/zero >&2; echo done"})
    seen, stdout = take_stream(host, 1, Channel.STDERR, INITIAL_WINDOW)
    assert seen == INITIAL_WINDOW
    assert_quiet(host, 1.0)
    assert stdout == b""  # `echo done` waits behind the blocked stderr
    host.window(1, Channel.STDERR, 4 * MIB)
    streams, response = host.response(1)
    assert streams["stdout"] == b"done\n"
    assert len(streams["stderr"]) == 3_000_000 - INITIAL_WINDOW
    assert response["exit_code"] == 0


def test_file_read_within_the_credit(host: RawHost, home: Path) -> None:
    path = home / "big"
    path.write_bytes(b"x" * (3 * MIB))
    host.hello([2])
    host.request(1, {"op": "read", "path": str(path), "user": "root"})
    seen, _ = take_stream(host, 1, Channel.FILE, INITIAL_WINDOW)
    assert seen == INITIAL_WINDOW
    assert_quiet(host, 1.0)
    host.window(1, Channel.FILE, 2 * MIB)
    streams, response = host.response(1)
    assert response == {"ok": True, "size": 3 * MIB}
    assert len(streams["file"]) == 2 * MIB


def test_window_of_unknown_requests_and_other_channels_is_ignored(host: RawHost) -> None:
    host.hello([2])
    host.window(77, Channel.STDOUT, 100)  # never started
    host.request(1, {"op": "exec", "argv": ["true"]})
    _, response = host.response(1)
    host.window(1, Channel.STDOUT, 100)  # finished
    host.request(2, {"op": "exec", "argv": ["sleep", "0.5"]})
    host.window(2, Channel.STDIN, 100)  # a stream the agent does not send
    _, response = host.response(2)
    assert response["exit_code"] == 0
    host.request(3, {"op": "ping"})
    assert decode_json(host.recv())["ok"] is True


@pytest.mark.parametrize(
    "payload",
    [b"\x00\x00\x00\x00", b"\x00\x01", b"\x7f\xff\xff\xff\x00"],
    ids=["zero", "short", "long"],
)
def test_malformed_window_is_a_protocol_error(host: RawHost, payload: bytes) -> None:
    host.hello([2])
    host.request(1, {"op": "exec", "argv": ["sleep", "30"]})
    host.send(HEADER.pack(1, FrameType.WINDOW, Channel.STDOUT, 0, 1, len(payload)) + payload)
    error = host.recv()
    assert error.type == FrameType.ERROR and decode_json(error)["error"] == ErrorKind.PROTOCOL


def test_credit_overflow_is_a_protocol_error(host: RawHost) -> None:
    host.hello([2])
    host.request(1, {"op": "exec", "argv": ["sleep", "30"]})
    host.window(1, Channel.STDOUT, (1 << 31) - 1)  # plus the initial credit: past 2^31 - 1
    error = host.recv()
    assert error.type == FrameType.ERROR and "WINDOW" in decode_json(error)["message"]


def test_stdin_beyond_the_agents_bound_stops_the_command(host: RawHost) -> None:
    from warden.guest.stdin import MAX_QUEUED

    host.hello([2])
    host.request(1, {"op": "exec", "argv": ["sleep", "30"], "stdin": True})
    piece = b"s" * (1 << 20)
    started = time.monotonic()
    for _ in range(MAX_QUEUED // len(piece) + 2):
        host.send(encode_header(FrameType.DATA, 1, Channel.STDIN, len(piece)) + piece)
    _, response = host.response(1)
    assert time.monotonic() - started < 20  # stopped, not left to sleep
    assert response["ok"] is False and response["error"] == ErrorKind.INVALID
    assert "stdin" in response["message"]
