"""The exec output stream's records (``warden.records``), read as hostile input."""

from __future__ import annotations

import pytest

from warden import records
from warden.records import Kind, RecordDecoder, StreamError


def _stream() -> bytes:
    return (
        records.encode_control({"exec_id": "abc"})
        + records.encode(Kind.STDOUT, b"out\x00\xff")
        + records.encode(Kind.STDERR, b"")
        + records.encode_control({"exit_code": 3, "signal": None, "timed_out": False})
    )


@pytest.mark.parametrize("step", [1, 2, 5, 7, 4096])
def test_records_survive_any_split(step: int) -> None:
    data = _stream()
    decoder = RecordDecoder()
    got = []
    for i in range(0, len(data), step):
        got += decoder.feed(data[i : i + step])
    decoder.end()
    assert got == [
        (Kind.CONTROL, {"exec_id": "abc"}),
        (Kind.STDOUT, b"out\x00\xff"),
        (Kind.STDERR, b""),
        (Kind.CONTROL, {"exit_code": 3, "signal": None, "timed_out": False}),
    ]


def test_an_oversized_length_is_refused_before_its_payload_comes() -> None:
    decoder = RecordDecoder()
    header = records.HEADER.pack(Kind.STDOUT, records.MAX_DATA + 1)
    with pytest.raises(StreamError, match="at most"):
        decoder.feed(header)  # no payload sent: the header alone is refused
    big_control = records.HEADER.pack(Kind.CONTROL, records.MAX_CONTROL + 1)
    with pytest.raises(StreamError, match="control record"):
        RecordDecoder().feed(big_control)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (records.HEADER.pack(9, 0), "unknown kind 9"),
        (records.encode(Kind.CONTROL, b"{nope"), "not JSON"),
        (records.encode(Kind.CONTROL, b"[1]"), "not a JSON object"),
        (
            records.encode_control({"exit_code": 0}) + records.encode(Kind.STDOUT, b"x"),
            "after the command's final status",
        ),
    ],
)
def test_malformed_streams_are_errors(data: bytes, match: str) -> None:
    with pytest.raises(StreamError, match=match):
        RecordDecoder().feed(data)


def test_a_stream_must_end_at_a_final_record() -> None:
    decoder = RecordDecoder()
    decoder.feed(records.encode(Kind.STDOUT, b"x"))
    with pytest.raises(StreamError, match="without a final status"):
        decoder.end()
    decoder = RecordDecoder()
    decoder.feed(records.encode(Kind.STDOUT, b"xyz")[:-1])
    with pytest.raises(StreamError, match="inside a record"):
        decoder.end()
