"""Tests of the wire framing (warden.wire.frame): round trips, chunking, malformed input."""

from __future__ import annotations

import itertools
import json
import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.wire.frame import (
    HEADER,
    HEADER_SIZE,
    HELLO_MAX_PAYLOAD,
    MAX_PAYLOAD,
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    RESYNC_PADDING_SIZE,
    XFER_REF,
    Channel,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_json,
    decode_xfer_ref,
    encode,
    encode_json,
    encode_xfer_ref,
)

frames = st.builds(
    Frame,
    st.sampled_from(FrameType),
    st.integers(0, MAX_REQUEST_ID),
    st.sampled_from(Channel),
    st.binary(max_size=3000),
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped and sorted)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def header(
    *,
    version: int = PROTOCOL_VERSION,
    ftype: int = FrameType.DATA,
    channel: int = Channel.STDOUT,
    flags: int = 0,
    request_id: int = 1,
    length: int = 0,
) -> bytes:
    return HEADER.pack(version, ftype, channel, flags, request_id, length)


def test_header_layout() -> None:
    frame = Frame(FrameType.REQUEST, 0x01020304, Channel.FILE, b"xyz")
    data = encode(frame)
    assert HEADER_SIZE == 12
    assert data == bytes([1, FrameType.REQUEST, 4, 0, 1, 2, 3, 4, 0, 0, 0, 3]) + b"xyz"
    assert MAX_PAYLOAD == 1 << 20


@given(st.lists(frames, max_size=20), st.lists(st.integers(0, 70_000), max_size=40))
def test_round_trip_with_any_chunking(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode(f) for f in sent)
    decoder = FrameDecoder()
    received: list[Frame] = []
    for piece in split(stream, cuts):
        received.extend(decoder.feed(piece))
    assert received == sent
    assert decoder.buffered == 0
    for frame in received:
        assert type(frame.type) is FrameType
        assert type(frame.channel) is Channel
        assert type(frame.payload) is bytes


@given(st.lists(frames, min_size=1, max_size=5))
def test_byte_at_a_time(sent: list[Frame]) -> None:
    stream = b"".join(encode(f) for f in sent)
    decoder = FrameDecoder()
    received: list[Frame] = []
    for i in range(len(stream)):
        received.extend(decoder.feed(stream[i : i + 1]))
    assert received == sent


@given(frames, st.sampled_from([bytearray, memoryview]))
def test_feed_accepts_bytes_like(frame: Frame, kind: type) -> None:
    assert FrameDecoder().feed(kind(encode(frame))) == [frame]


@given(st.sampled_from(FrameType), st.integers(0, MAX_REQUEST_ID), json_objects)
def test_json_round_trip(ftype: FrameType, rid: int, obj: dict[str, object]) -> None:
    data = encode_json(ftype, rid, obj)
    (frame,) = FrameDecoder().feed(data)
    assert frame.type == ftype
    assert frame.request_id == rid
    assert frame.channel == Channel.CONTROL
    assert decode_json(frame) == obj
    assert data[HEADER_SIZE:] == json.dumps(obj, separators=(",", ":")).encode()  # compact


def test_json_keeps_undecodable_names() -> None:
    name = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8, as os.listdir returns it
    (frame,) = FrameDecoder().feed(encode_json(FrameType.RESPONSE, 1, {"name": name}))
    assert decode_json(frame) == {"name": name}
    frame.payload.decode("ascii")


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_random_bytes_raise_only_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    try:
        for piece in split(data, cuts):
            for frame in decoder.feed(piece):
                assert isinstance(frame, Frame)
    except FrameError:
        with pytest.raises(FrameError):
            decoder.feed(encode(Frame(FrameType.DATA, 1, Channel.STDIN, b"ok")))


@given(st.binary(max_size=200))
def test_decode_json_raises_only_frame_error(payload: bytes) -> None:
    frame = Frame(FrameType.RESPONSE, 1, Channel.CONTROL, payload)
    try:
        obj = decode_json(frame)
    except FrameError:
        return
    assert isinstance(obj, dict)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"version": 0}, "version"),
        ({"version": 2}, "version"),
        ({"ftype": 0}, "type"),
        ({"ftype": 9}, "type"),
        ({"ftype": 255}, "type"),
        ({"channel": 7}, "channel"),
        ({"flags": 1}, "flags"),
        ({"length": MAX_PAYLOAD + 1}, "length"),
        ({"length": 0xFFFFFFFF}, "length"),
    ],
)
def test_bad_header_kills_the_decoder(fields: dict[str, int], match: str) -> None:
    decoder = FrameDecoder()
    good = encode(Frame(FrameType.DATA, 7, Channel.STDOUT, b"before"))
    with pytest.raises(FrameError, match=match):
        decoder.feed(good + header(**fields))  # the header alone is enough to reject it
    with pytest.raises(FrameError, match=match):
        decoder.feed(good)  # dead: raises again


def test_bad_header_after_valid_frames_in_the_same_feed() -> None:
    good = encode(Frame(FrameType.EOF, 3, Channel.STDERR))
    decoder = FrameDecoder()
    assert decoder.feed(good) == [Frame(FrameType.EOF, 3, Channel.STDERR, b"")]
    with pytest.raises(FrameError) as caught:
        decoder.feed(good + good + header(version=9) + good)
    # the frames before the bad header are handed over, so the caller can still act on them
    assert caught.value.frames == [Frame(FrameType.EOF, 3, Channel.STDERR, b"")] * 2
    with pytest.raises(FrameError) as again:
        decoder.feed(good)
    assert again.value.frames == []


def test_max_payload_is_enforced_both_ways() -> None:
    big = Frame(FrameType.DATA, 1, Channel.FILE, bytes(MAX_PAYLOAD))
    assert FrameDecoder().feed(encode(big)) == [big]
    with pytest.raises(FrameError):
        encode(Frame(FrameType.DATA, 1, Channel.FILE, bytes(MAX_PAYLOAD + 1)))
    small = FrameDecoder(max_payload=10)
    with pytest.raises(FrameError, match="length"):
        small.feed(header(length=11))


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.DATA, -1, Channel.STDIN, b""),
        Frame(FrameType.DATA, MAX_REQUEST_ID + 1, Channel.STDIN, b""),
        Frame(99, 1, Channel.STDIN, b""),  # type: ignore[arg-type]
        Frame(FrameType.DATA, 1, 9, b""),  # type: ignore[arg-type]
        Frame(FrameType.DATA, 1, Channel.STDIN, "text"),  # type: ignore[arg-type]
    ],
)
def test_encode_validates(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode(frame)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[1, 2]", b'"s"', b"null", b"\xff\xfe{}", b"{}x", b"[" * 100_000],
)
def test_decode_json_rejects(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_json(Frame(FrameType.REQUEST, 1, Channel.CONTROL, payload))


def test_encode_json_rejects() -> None:
    with pytest.raises(FrameError):
        encode_json(FrameType.REQUEST, 1, {"x": object()})
    with pytest.raises(FrameError):
        encode_json(FrameType.REQUEST, 1, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode_json(FrameType.REQUEST, 1, {"x": "y" * MAX_PAYLOAD})


def test_streaming_is_linear() -> None:
    """64 MiB in 1 MiB frames fed in 4 KiB pieces takes ~0.05 s; re-copying the partial frame
    on every feed takes seconds."""
    frame = encode(Frame(FrameType.DATA, 5, Channel.FILE, os.urandom(MAX_PAYLOAD)))
    stream = frame * 64
    decoder = FrameDecoder()
    count = 0
    start = time.perf_counter()
    view = memoryview(stream)
    for i in range(0, len(stream), 4096):
        count += len(decoder.feed(view[i : i + 4096]))
    elapsed = time.perf_counter() - start
    assert count == 64
    assert elapsed < 1.0, f"64 MiB took {elapsed:.2f}s ({64 / elapsed:.0f} MiB/s)"


@given(
    offset=st.integers(min_value=0, max_value=1 << 40).map(lambda n: n * 4096),
    length=st.integers(min_value=1, max_value=4 << 20),
)
def test_xfer_references_round_trip(offset: int, length: int) -> None:
    assert decode_xfer_ref(encode_xfer_ref(offset, length)) == (offset, length)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 11,
        b"\x00" * 13,
        XFER_REF.pack(1, 10),
        XFER_REF.pack(0, 0),
        XFER_REF.pack(0, (4 << 20) + 1),
    ],
)
def test_bad_xfer_references_are_frame_errors(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_xfer_ref(payload)


# --------------------------------------------------------------------------------------------
# hunting for a HELLO (resynchronising a stream an earlier host left mid-frame)


def _hello(nonce: str) -> bytes:
    return encode_json(FrameType.HELLO, 0, {"versions": [PROTOCOL_VERSION], "nonce": nonce})


@given(junk=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 6000), max_size=6))
def test_a_hunting_decoder_skips_to_the_first_hello(junk: bytes, cuts: list[int]) -> None:
    after = encode(Frame(FrameType.REQUEST, 5, Channel.CONTROL, b'{"op":"ping"}'))
    stream = junk + _hello("n") + after
    decoder = FrameDecoder(hunt=True)
    got: list[Frame] = []
    for piece in split(stream, cuts):  # the mark may be split across reads
        got.extend(decoder.feed(piece))
    # junk could hold a HELLO or ERROR header of its own (the hunt stops at either)
    if all(bytes([1, t, 0, 0, 0, 0, 0, 0]) not in junk for t in (1, 6)):
        assert [f.type for f in got] == [FrameType.HELLO, FrameType.REQUEST]
        assert decode_json(got[0])["nonce"] == "n"
    assert not decoder.hunting


def test_padding_completes_a_half_sent_frame_and_is_skipped() -> None:
    """What a host taking over from a dead one sends: zeros, then its HELLO."""
    decoder = FrameDecoder()
    half = encode(Frame(FrameType.DATA, 1, Channel.STDIN, bytes(MAX_PAYLOAD)))[: MAX_PAYLOAD // 3]
    assert decoder.feed(half) == []
    with pytest.raises(FrameError) as caught:  # the first whole frame is the old one
        decoder.feed(bytes(RESYNC_PADDING_SIZE) + _hello("new"))
    assert [f.request_id for f in caught.value.frames] == [1]
    with pytest.raises(FrameError):
        decoder.feed(b"")  # dead until resync
    decoder.resync()
    (hello,) = decoder.feed(b"")
    assert decode_json(hello)["nonce"] == "new"


def test_resync_hunts_from_the_byte_after_the_bad_header() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\x07" + _hello("a"))  # a bad version byte glued to a HELLO
    decoder.resync()
    (hello,) = decoder.feed(b"")
    assert decode_json(hello)["nonce"] == "a"


def test_a_hello_is_small() -> None:
    with pytest.raises(FrameError, match="HELLO"):
        encode(Frame(FrameType.HELLO, 0, Channel.CONTROL, bytes(HELLO_MAX_PAYLOAD + 1)))
    decoder = FrameDecoder(hunt=True)
    with pytest.raises(FrameError, match="HELLO"):  # a false start while hunting
        decoder.feed(HEADER.pack(PROTOCOL_VERSION, FrameType.HELLO, 0, 0, 0, HELLO_MAX_PAYLOAD + 1))
    decoder.resync()
    (hello,) = decoder.feed(_hello("b"))
    assert decode_json(hello)["nonce"] == "b"
