"""The exec output stream of the daemon's HTTP API: binary records, shared by the daemon (which
writes them, ``server/lines.py``) and the SDK and CLI (which read them, ``sdk/_lines.py``).

The body of ``POST /v1/sandboxes/{ref}/exec`` (media type :data:`MEDIA_TYPE`) is a sequence of
records, each a 5-byte header and a payload:

======  =====================  ==========================================================
offset  field                  meaning
======  =====================  ==========================================================
0       kind (u8)              1 stdout, 2 stderr, 3 control
1       length (u32, big end)  payload bytes: at most :data:`MAX_DATA` (stdout, stderr) or
                               :data:`MAX_CONTROL` (control)
5       payload                raw output bytes, or one compact JSON object (control)
======  =====================  ==========================================================

Control records are ``{"exec_id": ...}`` (first, for streamed stdin), then exactly one final
record: ``{"exit_code", "signal", "timed_out"}`` or ``{"error": message}``, which ends the body.
Output is never base64: the stream is as cheap to read as the bytes themselves.

The reader treats the stream as hostile input: a bad kind, an oversized length, bad JSON, a
record after the final one or a body that ends without one is a :class:`StreamError`, and it
never holds more than one record plus one read.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

from warden._errors import ProtocolError

MEDIA_TYPE = "application/vnd.warden.exec-stream"
HEADER = struct.Struct(">BI")
MAX_DATA = 1 << 20
"""The largest stdout/stderr payload (the agent protocol's own DATA limit)."""
MAX_CONTROL = 64 * 1024


class Kind(IntEnum):
    STDOUT = 1
    STDERR = 2
    CONTROL = 3


class StreamError(ProtocolError):
    """The daemon's exec output stream broke its format; the connection was closed."""


def encode(kind: Kind, payload: bytes) -> bytes:
    """One record (the payload must be within its kind's limit)."""
    return HEADER.pack(kind, len(payload)) + payload


def encode_control(obj: dict[str, Any]) -> bytes:
    return encode(Kind.CONTROL, json.dumps(obj, separators=(",", ":")).encode())


class RecordDecoder:
    """Splits received bytes into records, checking each header before it waits for a payload."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.finished = False
        """The final control record was seen: nothing may follow it."""

    def feed(self, data: bytes) -> list[tuple[Kind, bytes | dict[str, Any]]]:
        """The records completed by ``data``: (kind, bytes) or (CONTROL, JSON object)."""
        if data and self.finished:
            raise StreamError("the daemon sent output after the command's final status")
        self._buffer += data
        records: list[tuple[Kind, bytes | dict[str, Any]]] = []
        buffer = self._buffer
        while len(buffer) >= HEADER.size:
            raw_kind, length = HEADER.unpack_from(buffer)
            kind = _kind(raw_kind, length)
            end = HEADER.size + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[HEADER.size : end])
            del buffer[:end]
            if kind is Kind.CONTROL:
                records.append((kind, self._control(payload)))
            else:
                records.append((kind, payload))
            if self.finished and buffer:
                raise StreamError("the daemon sent output after the command's final status")
        return records

    def end(self) -> None:
        """The body ended: it must have ended at a final record."""
        if self._buffer:
            raise StreamError("the daemon's output stream ended inside a record")
        if not self.finished:
            raise StreamError("the daemon ended the command's output without a final status")

    def _control(self, payload: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(payload)
        except ValueError:
            raise StreamError("the daemon sent a control record that is not JSON") from None
        if not isinstance(obj, dict):
            raise StreamError("the daemon sent a control record that is not a JSON object")
        if "exec_id" not in obj:
            self.finished = True
        return obj


def _kind(raw: int, length: int) -> Kind:
    try:
        kind = Kind(raw)
    except ValueError:
        raise StreamError(f"the daemon sent a record of unknown kind {raw}") from None
    limit = MAX_CONTROL if kind is Kind.CONTROL else MAX_DATA
    if length > limit:
        raise StreamError(
            f"the daemon sent a {kind.name.lower()} record of {length} bytes (at most {limit})"
        )
    return kind
