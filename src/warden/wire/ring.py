"""The layout of a link's shared-memory region: two single-producer, single-consumer rings.

A link's fast path (issue 10) is a region that only the two QEMUs of the link map, as an
``ivshmem-plain`` PCI device (BAR 2) in each guest. The host makes the region, writes its
header and never touches it again until the link ends (then it zeroes and frees it). Each
guest's agent maps BAR 2 and moves sealed records (:mod:`warden.channel.linkseal`) through it.
This module is the layout only: offsets, the header, the record header; no I/O.

**Everything in the region is untrusted.** The other guest can write any byte of it at any
time: a reader copies a record out of the region before it checks anything, bounds every
length and counter by :data:`CAPACITY`, and authenticates every record (AEAD) before use.

Layout (little-endian; all offsets are multiples of 64, so each counter has its own cache
line):

- ``0``: the header, written by the host before the region is plugged in: :data:`MAGIC`,
  :data:`VERSION`, the header's size, the capacity of each ring, and the link's 16-byte id
  (random, sent to each agent in ``link-open``: an agent maps only the region whose id is the
  one it was told).
- ``HEAD[d]``, ``TAIL[d]`` for direction ``d`` (0 is a->b, 1 is b->a): 64-bit byte counters,
  never wrapped. The writer of direction ``d`` advances its head after the record's bytes are
  in place; the reader advances its tail after it copied the record out. ``head - tail`` is
  the bytes in flight, at most :data:`CAPACITY`, and both are multiples of :data:`ALIGN`.
- ``DATA[d]``: the ring's bytes, :data:`CAPACITY` each; byte ``n`` of the stream of
  direction ``d`` is at ``DATA[d] + n % CAPACITY``.

A record is an 8-byte header (``u32`` length of the sealed bytes, ``u8`` kind, 3 zero bytes)
then the sealed bytes, padded to :data:`ALIGN`. A record never wraps: where one would not fit
before the ring's end, the writer puts a :data:`KIND_PAD` header (its length: the bytes to the
end, less the header) and goes on at the ring's start.
"""

from __future__ import annotations

import struct

__all__ = [
    "ALIGN",
    "CAPACITY",
    "DATA",
    "HEAD",
    "HEADER",
    "HEADER_SIZE",
    "ID_SIZE",
    "KIND_DATA",
    "KIND_END",
    "KIND_PAD",
    "MAGIC",
    "MAX_RECORD",
    "RECORD",
    "REGION_SIZE",
    "TAIL",
    "VERSION",
    "RingLayoutError",
    "check_header",
    "pack_header",
    "pad_before",
    "span",
]

MAGIC = b"WDNLINK1"
VERSION = 1
REGION_SIZE = 4 << 20
"""The region's bytes (a power of two: a PCI BAR)."""
HEADER_SIZE = 4096
CAPACITY = (REGION_SIZE - HEADER_SIZE) // 2 // 4096 * 4096
"""The bytes of each direction's ring."""
ID_SIZE = 16
ALIGN = 8
HEADER = struct.Struct("<8sIIQ16s")
"""magic, version, header size, capacity, link id."""
HEAD = (64, 192)
"""Offsets of each direction's head (u64, written by its writer only)."""
TAIL = (128, 256)
"""Offsets of each direction's tail (u64, written by its reader only)."""
DATA = (HEADER_SIZE, HEADER_SIZE + CAPACITY)
RECORD = struct.Struct("<IB3x")
"""A record's header: the sealed bytes' length, the kind."""
KIND_DATA = 0
"""A record of the stream's bytes (the same byte as linkseal's DATA associated data)."""
KIND_END = 1
"""The last record of a direction (linkseal's END)."""
KIND_PAD = 0xFF
"""A record that only skips to the ring's start."""
MAX_RECORD = 256 * 1024
"""The most sealed bytes in one record (a record of linkseal's largest plaintext fits)."""

assert CAPACITY % ALIGN == 0 and 4 * (MAX_RECORD + RECORD.size) <= CAPACITY
assert DATA[1] + CAPACITY <= REGION_SIZE


class RingLayoutError(Exception):
    """The region's header is not a warden link's, or not this link's."""


def pack_header(link_id: bytes) -> bytes:
    """The header the host writes at offset 0 (counters start at zero: a fresh region)."""
    if len(link_id) != ID_SIZE:
        raise ValueError(f"a link id is {ID_SIZE} bytes")
    return HEADER.pack(MAGIC, VERSION, HEADER_SIZE, CAPACITY, link_id)


def check_header(raw: bytes, link_id: bytes) -> None:
    """Check a region's header (copied out of the region first) against ``link_id``."""
    if len(raw) < HEADER.size:
        raise RingLayoutError("the region is shorter than a header")
    magic, version, header_size, capacity, found = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise RingLayoutError("not a warden link region of this version")
    if header_size != HEADER_SIZE or capacity != CAPACITY:
        raise RingLayoutError("the region's sizes are not this version's")
    if found != link_id:
        raise RingLayoutError("the region belongs to another link")


def span(size: int) -> int:
    """The ring bytes a record of ``size`` sealed bytes takes: its header, then the bytes
    padded to :data:`ALIGN`."""
    return RECORD.size + -(-size // ALIGN) * ALIGN


def pad_before(head: int, size: int) -> int:
    """The bytes a writer at stream position ``head`` skips (a :data:`KIND_PAD` record) before
    a record of ``size`` sealed bytes, so that the record does not wrap: 0 if it fits before
    the ring's end, else the bytes to the end."""
    at = head % CAPACITY
    return 0 if at + span(size) <= CAPACITY else CAPACITY - at
