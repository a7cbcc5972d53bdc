"""Authenticating the transfer window: each piece bound to its request and sequence number.

Large file writes do not travel through the channel's records: the host puts each piece
(up to a slot, 1 MiB) into the transfer window, a per-VM disk, and sends only a reference
(offset, length) through the encrypted channel. The disk's bytes are outside the channel, so
each piece carries a tag that the agent checks before it uses a byte of it:

    tag = ChaCha20-Poly1305(key).encrypt(nonce, plaintext=b"", associated_data=piece)
    nonce = request id (u32, big-endian) || sequence number of the piece in the session (u64)

That is the AEAD of RFC 8439 (section 2.8) with the piece as additional authenticated data
and an empty plaintext: its 16-byte tag is a MAC of the piece. The key is random, made by the
host for each session and handed to the agent in the session's HELLO, inside the encrypted
channel; the tag travels in the reference, inside the channel too. So a piece that is
altered, swapped with another slot's, replayed from an earlier request or session, or
reordered fails the check. Both sides count the session's pieces in the order their references
travel in the channel (which keeps order), so no nonce repeats under one key.

File reads (guest -> host) use the window the other way: the agent writes each piece into a
slot the host lent to that read and sends a tagged reference; the host checks the tag before
it hands a byte to its caller. Those pieces are tagged under a key of their own,
``reads_key(key)`` (HMAC-SHA256 of the session's key with a label), and numbered in a
sequence of their own (in the order their references travel, guest -> host): a piece can
never be replayed from one direction into the other, even at the same request id and number.

Why not encrypt the pieces too: a guest under TCG decrypts ChaCha20-Poly1305 at about
110 MB/s (with OpenSSL's scalar code; its SIMD code is slower under TCG), against about
520 MB/s for the Poly1305 tag alone, which would cut a 64 MiB write to about 0.4x of
plaintext, past the 0.5x the benchmark allows (see docs/benchmarks.md). The window disk is the
VM's own file, root-only on the host and the VM uid's inside its jail, and only its own QEMU
maps it; the pieces are the data the host is writing into that VM.
"""

from __future__ import annotations

import struct

__all__ = ["WINDOW_KEY_SIZE", "WindowAuth", "reads_key", "window_nonce"]

WINDOW_KEY_SIZE = 32
_NONCE = struct.Struct(">IQ")
_READS_LABEL = b"warden transfer window: guest -> host pieces"


def reads_key(key: bytes) -> bytes:
    """The key of the pieces of file reads (guest -> host), derived from the session's key."""
    import hmac

    return hmac.digest(key, _READS_LABEL, "sha256")


def window_nonce(request_id: int, sequence: int) -> bytes:
    """The 96-bit nonce of a piece: its request id and its sequence number in the request."""
    return _NONCE.pack(request_id, sequence)


class WindowAuth:
    """Tags and checks the pieces of one session's transfer window."""

    __slots__ = ("_aead", "_evp")

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        from warden.channel import evp

        if len(key) != WINDOW_KEY_SIZE:
            raise ValueError(f"a window key is {WINDOW_KEY_SIZE} bytes, not {len(key)}")
        self._aead = ChaCha20Poly1305(key)
        # The guest checks pieces in place through EVP (channel/evp.py): no copy of the piece,
        # and no cipher context set up per piece.
        self._evp = evp.EvpChaCha20Poly1305(key) if evp.available() else None

    def tag(self, request_id: int, sequence: int, piece: bytes | memoryview) -> bytes:
        """The 16-byte tag of ``piece``, the ``sequence``-th of request ``request_id``."""
        return self._aead.encrypt(window_nonce(request_id, sequence), b"", _bytes(piece))

    def tag_in_place(self, request_id: int, sequence: int, piece: memoryview) -> bytes:
        """:meth:`tag` of a writable buffer, read in place where EVP is loaded (the guest)."""
        if self._evp is not None and not piece.readonly:
            return self._evp.tag(window_nonce(request_id, sequence), piece)
        return self.tag(request_id, sequence, piece)

    def check(self, request_id: int, sequence: int, piece: bytes | memoryview, tag: bytes) -> bool:
        """Whether ``tag`` is the tag of ``piece`` at that place."""
        from cryptography.exceptions import InvalidTag

        if self._evp is not None and isinstance(piece, memoryview) and not piece.readonly:
            return self._evp.verify(window_nonce(request_id, sequence), tag, piece)
        try:
            self._aead.decrypt(window_nonce(request_id, sequence), tag, _bytes(piece))
        except InvalidTag:
            return False
        return True


def _bytes(piece: bytes | memoryview) -> bytes:
    """``cryptography`` 38 (the guest's) takes associated data only as bytes: one copy."""
    return piece if isinstance(piece, bytes) else bytes(piece)
