"""The end-to-end records of a VM-to-VM link: ChaCha20-Poly1305 under a per-link key.

Both guests of a link hold the link's 32-byte key (made by the manager, handed to each agent
over its own Noise channel); the host relays the records and can neither read nor forge them.

- **Keys.** Each direction has its own key, derived from the link key with HKDF-SHA256
  (RFC 5869; no salt, info ``warden-link a->b`` or ``warden-link b->a``), so the two
  directions never share a (key, nonce) pair.
- **Records.** One record is the ChaCha20-Poly1305 (RFC 8439) sealing of at most
  :data:`MAX_PLAINTEXT` bytes, its 16-byte tag appended. The 96-bit nonce is the direction
  byte (0 for a->b, 1 for b->a), three zero bytes and the record's 64-bit big-endian counter
  in that direction; the associated data is one byte, the record's kind: :data:`DATA`, or
  :data:`END` (an empty record: the writer shut its side down). A receiver takes records in
  order and checks each against the counter it expects, so a record dropped, replayed,
  reordered, altered or forged by the relay fails authentication; so does a stream cut short
  (the end of a direction is an authenticated END record, never a frame the host could send).
- **Rotation.** After :data:`REKEY_RECORDS` records or :data:`REKEY_BYTES` bytes of
  plaintext under one key, both sides replace that direction's key with
  HKDF-SHA256(current key, info ``warden-link-rekey``) and restart its counter at 0, in
  lockstep (both count the same records).

Standard library (``hmac``, ``hashlib``) plus the first of these that loads:
:mod:`warden.channel.sodium` (ctypes binding of libsodium's ChaCha20-Poly1305: one call per
record, the cheapest in a TCG guest on small records; it hands records over 16 KiB to
OpenSSL's), :mod:`warden.channel.evp` (OpenSSL's) or ``cryptography``'s ChaCha20Poly1305: the
same algorithm, the same bytes. This module runs in the guest.
"""

from __future__ import annotations

import hmac
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class _Aead(Protocol):
        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...

        def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...


__all__ = [
    "DATA",
    "END",
    "KEY_SIZE",
    "MAX_PLAINTEXT",
    "OVERHEAD",
    "REKEY_BYTES",
    "REKEY_RECORDS",
    "LinkAuthError",
    "Opener",
    "Sealer",
    "direction_keys",
    "hkdf_sha256",
    "next_key",
]

KEY_SIZE = 32
TAG_SIZE = 16
OVERHEAD = TAG_SIZE
"""What a record adds to its plaintext."""
MAX_PLAINTEXT = 256 * 1024 - OVERHEAD
"""The largest plaintext of one record (a record fits the agent's 256 KiB reads)."""
DATA = b"\x00"
END = b"\x01"
REKEY_RECORDS = 1 << 20
"""Records under one key before it rotates."""
REKEY_BYTES = 1 << 30
"""Plaintext bytes under one key before it rotates (whichever comes first)."""
REKEY_INFO = b"warden-link-rekey"
_DIRECTIONS = {"a": 0, "b": 1}
_NONCE = struct.Struct(">B3xQ")


class LinkAuthError(Exception):
    """A record failed authentication: altered, forged, dropped, replayed or reordered."""


def hkdf_sha256(ikm: bytes, info: bytes, length: int = KEY_SIZE, salt: bytes = b"") -> bytes:
    """HKDF-SHA256 of RFC 5869 (extract, then expand)."""
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def direction_keys(link_key: bytes) -> dict[int, bytes]:
    """The key of each direction (0: a->b, 1: b->a)."""
    if len(link_key) != KEY_SIZE:
        raise ValueError(f"a link key is {KEY_SIZE} bytes, not {len(link_key)}")
    return {
        0: hkdf_sha256(link_key, b"warden-link a->b"),
        1: hkdf_sha256(link_key, b"warden-link b->a"),
    }


def next_key(key: bytes) -> bytes:
    """The key that follows ``key`` after a rotation."""
    return hkdf_sha256(key, REKEY_INFO)


def _aead(key: bytes) -> _Aead:
    from warden.channel import evp, sodium

    has_evp = evp.available() or evp.load()
    if sodium.available() or sodium.load():
        return sodium.SodiumChaCha20Poly1305(key, evp.EvpChaCha20Poly1305(key) if has_evp else None)
    if has_evp:
        return evp.EvpChaCha20Poly1305(key)
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


class _Direction:
    """One direction's key, counter and volume since the last rotation."""

    def __init__(self, link_key: bytes, direction: int) -> None:
        self.direction = direction
        self.key = direction_keys(link_key)[direction]
        self.aead = _aead(self.key)
        self.counter = 0
        self.volume = 0
        self.rotations = 0

    def nonce(self) -> bytes:
        return _NONCE.pack(self.direction, self.counter)

    def advance(self, size: int) -> None:
        """Count one record of ``size`` plaintext bytes; rotate the key when it is due."""
        self.counter += 1
        self.volume += size
        if self.counter >= REKEY_RECORDS or self.volume >= REKEY_BYTES:
            self.key = next_key(self.key)
            self.aead = _aead(self.key)
            self.counter = 0
            self.volume = 0
            self.rotations += 1


def _direction(role: str, sending: bool) -> int:
    if role not in _DIRECTIONS:
        raise ValueError(f"a link role is 'a' or 'b', not {role!r}")
    mine = _DIRECTIONS[role]
    return mine if sending else 1 - mine


class Sealer:
    """Seals what one end sends (role ``a`` sends a->b, ``b`` sends b->a). One thread."""

    def __init__(self, link_key: bytes, role: str) -> None:
        self._dir = _Direction(link_key, _direction(role, sending=True))
        self.ended = False

    @property
    def rotations(self) -> int:
        return self._dir.rotations

    def seal(self, plaintext: bytes) -> bytes:
        if self.ended:
            raise ValueError("the stream was ended")
        if not 0 < len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"a record holds 1 to {MAX_PLAINTEXT} bytes, not {len(plaintext)}")
        d = self._dir
        record = d.aead.encrypt(d.nonce(), plaintext, DATA)
        d.advance(len(plaintext))
        return record

    def end(self) -> bytes:
        """The END record: the last this end sends."""
        d = self._dir
        record = d.aead.encrypt(d.nonce(), b"", END)
        d.advance(0)
        self.ended = True
        return record


class Opener:
    """Opens what the other end sends, in order. One thread."""

    def __init__(self, link_key: bytes, role: str) -> None:
        self._dir = _Direction(link_key, _direction(role, sending=False))
        self.ended = False

    @property
    def rotations(self) -> int:
        return self._dir.rotations

    def open(self, record: bytes) -> bytes | None:
        """The plaintext of the next record; None for the END record. LinkAuthError if it is
        not the next record of this direction, or anything follows the END."""
        if self.ended:
            raise LinkAuthError("a record after the end of the stream")
        if len(record) < TAG_SIZE or len(record) > MAX_PLAINTEXT + TAG_SIZE:
            raise LinkAuthError(f"a record of {len(record)} bytes")
        d = self._dir
        kind = END if len(record) == TAG_SIZE else DATA
        try:
            plaintext = d.aead.decrypt(d.nonce(), record, kind)
        except Exception as exc:  # SodiumAuthError, EvpAuthError or cryptography's InvalidTag
            raise LinkAuthError("a record failed authentication") from exc
        d.advance(len(plaintext))
        if kind == END:
            self.ended = True
            return None
        return plaintext
