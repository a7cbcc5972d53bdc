"""Binary framing of the warden wire protocol (version 1).

Every frame is a 12-byte big-endian header followed by its payload::

    version u8 | type u8 | channel u8 | flags u8 | request_id u32 | length u32

This module does no I/O and uses the standard library only: the same file is copied into the
guest image and runs there under the guest's Python. Control payloads (HELLO, REQUEST, RESPONSE,
ERROR) are compact UTF-8 JSON objects; DATA payloads are raw bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

# Not ``typing.TYPE_CHECKING``: importing typing costs ~10 ms on the host and ~7x that in the
# guest under TCG, and nothing here needs it at run time. Type checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "HELLO_MAX_PAYLOAD",
    "INITIAL_WINDOW",
    "MAX_PAYLOAD",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "RESYNC_PADDING_SIZE",
    "SESSION_VERSION",
    "XFER_ALIGN",
    "XFER_MAX_LENGTH",
    "XFER_SERIAL",
    "XFER_TAG_SIZE",
    "Channel",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "decode_json",
    "decode_window",
    "decode_xfer_ref",
    "encode",
    "encode_json",
    "encode_window",
    "encode_xfer_ref",
    "xfer_ref_tag",
]

PROTOCOL_VERSION = 1
"""The framing version: the first byte of every header. The only one this module speaks."""

SESSION_VERSION = 2
"""The session protocol that a HELLO negotiates (its ``versions``/``version`` keys).

2 added WINDOW frames (flow control of what the guest sends) and the ``user`` of a request.
The framing did not change, so the header's version stays PROTOCOL_VERSION."""

MAX_PAYLOAD = 1 << 20
"""The largest payload a frame may carry (1 MiB)."""

MAX_REQUEST_ID = (1 << 32) - 1

HELLO_MAX_PAYLOAD = 64 << 10
"""The largest HELLO payload: a HELLO found while hunting (see below) is checked against it."""

# Resynchronising a stream. A host that takes over a guest from an earlier host (a manager
# restarted after kill -9) cannot know where that host's bytes stopped: the guest may still be
# reading a frame it half sent, and may still be sending frames meant for it. So a session
# starts at a HELLO, and a decoder can *hunt*: skip bytes until a HELLO header (version, type
# HELLO, channel 0, flags 0, request 0), or an ERROR one (the agent's refusal of a HELLO).
# The agent echoes the HELLO's nonce, so the host can tell its answer from stale ones. If no
# answer comes, the agent may have taken the HELLO for the rest of a half-sent frame: the host
# then sends RESYNC_PADDING_SIZE zero bytes, which complete any such frame and are then skipped
# by the agent's hunt, and its HELLO again.
RESYNC_PADDING_SIZE = 12 + MAX_PAYLOAD

# The bulk transfer window: a per-VM virtio-blk disk (serial XFER_SERIAL) that the host writes
# and the guest reads with O_DIRECT. A DATA frame on channel XFER carries a reference into it
# (offset, length) instead of the bytes; the guest answers each one with the same reference
# once it has consumed it, so the host can reuse that part of the window.
# Reads (guest -> host) run the other way on channel XFER_READ: the host lends slots of the
# window to a read (a DATA frame host -> guest with a reference (offset, slot size)); the
# agent writes a piece of the file into a lent slot with O_DIRECT and sends a reference to it
# (offset, length, tag) on XFER_READ; once the host's consumer took the piece, the host lends
# the slot again. The agent writes only into slots lent to that read and not yet filled.
XFER_SERIAL = "warden-xfer"
XFER_ALIGN = 4096
XFER_MAX_LENGTH = 4 << 20
XFER_REF = struct.Struct(">QI")
XFER_TAG_SIZE = 16

# Flow control of what the guest sends (stdout, stderr, file reads), like HTTP/2's
# WINDOW_UPDATE (RFC 9113, section 6.9). Each such stream of a request starts with a credit of
# INITIAL_WINDOW bytes. Every DATA frame the agent sends on it spends its payload's length; the
# host grants more with a WINDOW frame (host -> guest, on that request and channel, payload a
# u32 increment) once its consumer has taken the data. An agent with no credit left stops
# reading the process's pipe or the file, so a producer faster than its reader is slowed down
# instead of buffered. A DATA frame beyond the credit is a protocol error: the host ends the
# session. So the host holds at most INITIAL_WINDOW bytes of each stream.
INITIAL_WINDOW = 1 << 20
WINDOW = struct.Struct(">I")

HEADER = struct.Struct(">BBBBII")
"""version, type, channel, flags, request_id, length."""

HEADER_SIZE = HEADER.size  # 12


class FrameError(ValueError):
    """A malformed frame or payload.

    A plain ``ValueError`` subclass (not part of ``warden._errors``) because this module also runs
    in the guest, where only the standard library is available. When raised by
    :meth:`FrameDecoder.feed`, :attr:`frames` holds the complete frames that preceded the bad one
    in that call, so the caller can still act on them.
    """

    def __init__(self, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.frames: list[Frame] = frames if frames is not None else []


class FrameType(IntEnum):
    HELLO = 1
    REQUEST = 2
    DATA = 3
    EOF = 4
    RESPONSE = 5
    ERROR = 6
    CANCEL = 7
    WINDOW = 8


class Channel(IntEnum):
    CONTROL = 0
    STDIN = 1
    STDOUT = 2
    STDERR = 3
    FILE = 4
    XFER = 5
    XFER_READ = 6


_TYPES: dict[int, FrameType] = {t.value: t for t in FrameType}
# What a hunt stops at: the first 8 bytes of a HELLO or ERROR header on request 0.
_MARKS = tuple(
    HEADER.pack(PROTOCOL_VERSION, ftype, Channel.CONTROL, 0, 0, 0)[:8]
    for ftype in (FrameType.HELLO, FrameType.ERROR)
)
_MARK_SIZE = 8
_CHANNELS: dict[int, Channel] = {c.value: c for c in Channel}


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: its type, the request it belongs to, the stream within it, and the payload."""

    type: FrameType
    request_id: int
    channel: Channel = Channel.CONTROL
    payload: bytes = b""


def encode_header(ftype: int, request_id: int, channel: int, length: int) -> bytes:
    """Validate and pack one frame header (for writers that send the payload separately)."""
    if ftype not in _TYPES:
        raise FrameError(f"unknown frame type {ftype!r}")
    if channel not in _CHANNELS:
        raise FrameError(f"unknown channel {channel!r}")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise FrameError(f"request id {request_id!r} out of range")
    if not 0 <= length <= MAX_PAYLOAD:
        raise FrameError(f"payload of {length} bytes exceeds the maximum of {MAX_PAYLOAD}")
    if ftype == FrameType.HELLO and length > HELLO_MAX_PAYLOAD:
        raise FrameError(f"HELLO of {length} bytes exceeds the maximum of {HELLO_MAX_PAYLOAD}")
    return HEADER.pack(PROTOCOL_VERSION, ftype, channel, 0, request_id, length)


def encode(frame: Frame) -> bytes:
    """The wire bytes of ``frame``. Raises :class:`FrameError` if it cannot be sent."""
    payload = frame.payload
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise FrameError(f"payload must be bytes, not {type(payload).__name__}")
    header = encode_header(frame.type, frame.request_id, frame.channel, len(payload))
    return header + payload


def _dumps(obj: dict[str, Any]) -> bytes:
    # ensure_ascii keeps lone surrogates (undecodable file names) round-trippable as \udcxx
    # escapes, and ASCII is valid UTF-8.
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def encode_json(ftype: FrameType, request_id: int, obj: dict[str, Any]) -> bytes:
    """Encode a control frame whose payload is the compact JSON object ``obj``."""
    if not isinstance(obj, dict):
        raise FrameError(f"a control payload must be a JSON object, not {type(obj).__name__}")
    try:
        payload = _dumps(obj)
    except (TypeError, ValueError) as exc:
        raise FrameError(f"payload is not JSON-serializable: {exc}") from None
    return encode_header(ftype, request_id, Channel.CONTROL, len(payload)) + payload


def decode_json(frame: Frame) -> dict[str, Any]:
    """The JSON object carried by a control frame. Raises :class:`FrameError` otherwise."""
    try:
        obj = json.loads(frame.payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise FrameError(f"bad JSON in {_type_name(frame.type)} frame: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(
            f"{_type_name(frame.type)} payload must be a JSON object, not {type(obj).__name__}"
        )
    return obj


def _type_name(ftype: int) -> str:
    t = _TYPES.get(ftype)
    return t.name if t is not None else str(ftype)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back the complete frames.

    A partial frame is kept in a ``bytearray``; consumed bytes are dropped from its front, which
    CPython does in O(1), so streaming large payloads costs about one copy per byte. Once a
    malformed header was seen, the decoder is dead: every later :meth:`feed` raises again, until
    :meth:`resync`.

    A *hunting* decoder (``hunt=True``, or after :meth:`resync`) drops bytes until the next HELLO
    or ERROR header on request 0, and decodes normally from there: the way a session starts on a
    stream that may hold the stale tail of an earlier one.
    """

    __slots__ = ("_buf", "_error", "_hunting", "_max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD, *, hunt: bool = False) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._error: str | None = None
        self._hunting = hunt

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are held."""
        return len(self._buf)

    @property
    def hunting(self) -> bool:
        """Whether bytes are being skipped until the next HELLO or ERROR header."""
        return self._hunting

    def resync(self) -> None:
        """Hunt for the next HELLO (or ERROR), from the byte after the last malformed header."""
        self._error = None
        self._hunting = True

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise FrameError(self._error)
        buf = self._buf
        if self._hunting:
            if not self._hunt(data):
                return []
            data = b""  # it is in buf now, from the mark on
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data  # parse straight from the caller's buffer, keep only the tail
        rest = b""
        with memoryview(src) as view:
            frames, pos, problem = self._parse(view)
            if problem is not None:
                rest = bytes(view[pos + 1 :])  # where a resync hunts from
            elif src is not buf and pos < len(view):
                buf += view[pos:]
        if problem is not None:
            self._fail(problem, rest, frames)
        if src is buf:
            del buf[:pos]
        return frames

    def _parse(self, view: memoryview) -> tuple[list[Frame], int, str | None]:
        """The complete frames at the start of ``view``, the offset after them, and what is
        wrong with the header found there (None if nothing: then only an incomplete frame, if
        anything, is left)."""
        frames: list[Frame] = []
        pos = 0
        end_of_data = len(view)
        unpack_from = HEADER.unpack_from
        check = self._check
        while end_of_data - pos >= HEADER_SIZE:
            version, ftype, channel, flags, request_id, length = unpack_from(view, pos)
            problem = check(version, ftype, channel, flags, length)
            if problem is not None:
                return frames, pos, problem
            start = pos + HEADER_SIZE
            end = start + length
            if end > end_of_data:
                break
            frames.append(
                Frame(_TYPES[ftype], request_id, _CHANNELS[channel], bytes(view[start:end]))
            )
            pos = end
        return frames, pos, None

    def _hunt(self, data: bytes | bytearray | memoryview) -> bool:
        """Add ``data`` to the buffer and drop what precedes the first HELLO or ERROR header.

        False if there is none yet (then only a tail that may start a split mark is kept);
        True once found: hunting is over and the buffer starts at the header."""
        buf = self._buf
        buf += data
        at = min((i for i in map(buf.find, _MARKS) if i >= 0), default=-1)
        if at < 0:  # keep a tail that may be the start of a split mark
            del buf[: max(0, len(buf) - _MARK_SIZE + 1)]
            return False
        del buf[:at]
        self._hunting = False
        return True

    def _fail(self, problem: str, rest: bytes, frames: list[Frame]) -> NoReturn:
        """Die on a malformed header; keep ``rest`` (the bytes after its first) for a resync."""
        self._error = problem
        buf = self._buf
        buf.clear()
        buf += rest
        raise FrameError(problem, frames)

    def _check(self, version: int, ftype: int, channel: int, flags: int, length: int) -> str | None:
        if version != PROTOCOL_VERSION:
            return f"unsupported protocol version {version} (expected {PROTOCOL_VERSION})"
        if ftype not in _TYPES:
            return f"unknown frame type {ftype}"
        if channel not in _CHANNELS:
            return f"unknown channel {channel}"
        if flags != 0:
            return f"reserved flags set ({flags:#x})"
        if length > self._max_payload or (ftype == FrameType.HELLO and length > HELLO_MAX_PAYLOAD):
            return self._length_problem(length)
        return None

    def _length_problem(self, length: int) -> str:
        """Why a frame of ``length`` bytes is refused (the decoder's limit, else HELLO's)."""
        if length > self._max_payload:
            return f"frame length {length} exceeds the maximum of {self._max_payload}"
        return f"HELLO of {length} bytes exceeds the maximum of {HELLO_MAX_PAYLOAD}"


def encode_window(request_id: int, channel: int, increment: int) -> bytes:
    """A WINDOW frame granting ``increment`` more bytes on one stream of a request."""
    if not 0 < increment <= MAX_REQUEST_ID:
        raise FrameError(f"bad window increment {increment}")
    return encode_header(FrameType.WINDOW, request_id, channel, WINDOW.size) + WINDOW.pack(
        increment
    )


def decode_window(payload: bytes) -> int:
    """The increment of a WINDOW frame; FrameError if malformed."""
    if len(payload) != WINDOW.size:
        raise FrameError(f"a WINDOW payload is {WINDOW.size} bytes, not {len(payload)}")
    (increment,) = WINDOW.unpack(payload)
    if increment == 0:
        raise FrameError("a WINDOW increment of 0")
    return int(increment)


def encode_xfer_ref(offset: int, length: int, tag: bytes = b"") -> bytes:
    """The payload of an XFER DATA frame: offset, length, and (on an encrypted channel) the
    piece's XFER_TAG_SIZE-byte authentication tag (``warden.channel.window``)."""
    if offset < 0 or offset % XFER_ALIGN or not 0 < length <= XFER_MAX_LENGTH:
        raise FrameError(f"bad transfer window reference: offset {offset}, length {length}")
    if len(tag) not in (0, XFER_TAG_SIZE):
        raise FrameError(f"a transfer window tag is {XFER_TAG_SIZE} bytes, not {len(tag)}")
    return XFER_REF.pack(offset, length) + tag


def xfer_ref_tag(payload: bytes) -> bytes:
    """The authentication tag of a reference (b"" if it has none)."""
    return payload[XFER_REF.size :]


def decode_xfer_ref(payload: bytes) -> tuple[int, int]:
    """(offset, length) from an XFER DATA frame; FrameError if malformed."""
    if len(payload) not in (XFER_REF.size, XFER_REF.size + XFER_TAG_SIZE):
        raise FrameError(
            f"a transfer window reference is {XFER_REF.size} bytes (or "
            f"{XFER_REF.size + XFER_TAG_SIZE} with a tag), not {len(payload)}"
        )
    offset, length = XFER_REF.unpack_from(payload)
    if offset % XFER_ALIGN or not 0 < length <= XFER_MAX_LENGTH:
        raise FrameError(f"bad transfer window reference: offset {offset}, length {length}")
    return offset, length
