"""ChaCha20-Poly1305 (the IETF construction of RFC 8439) from libsodium, through ``ctypes``.

A link's records (:mod:`warden.channel.linkseal`) use it where libsodium loads (the guest image
installs Debian's ``libsodium23``); else OpenSSL through :mod:`warden.channel.evp`, else
``cryptography``. Same algorithm, same bytes: the unit tests check each record against
``cryptography``'s. Only the cost differs: one call per record
(``crypto_aead_chacha20poly1305_ietf_encrypt`` / ``_decrypt``, libsodium's documented AEAD
API: https://doc.libsodium.org/secret-key_cryptography/aead/chacha20-poly1305/ietf_chacha20-poly1305_construction)
instead of OpenSSL 3's five EVP calls, each through its provider dispatch. In a TCG guest a
64-byte encrypt right after a context switch (a link record's path: the client, then the
agent) took 88-120 us against 161-250 us with :mod:`~warden.channel.evp`; 21-24 us against
54-73 us in a hot loop (one guest, one run each).

Messages over :data:`BULK_BYTES` go to OpenSSL where the caller gives it (``bulk``): on 256 KiB
records libsodium streamed 17-21 MB/s through a link against 32-48 MB/s with OpenSSL (TCG
guests, ``bench.links``, one run each). Without it, calls hold the GIL (``ctypes.PyDLL``) except
on more than :data:`BULK_BYTES` (``ctypes.CDLL``, which releases it), as in
:mod:`~warden.channel.evp`. Standard library only: it runs in the guest. The key stays in the
object (bytes) for its life, like the other backends' contexts.
"""

from __future__ import annotations

import ctypes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class _Aead(Protocol):
        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...
        def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...


__all__ = [
    "TAG_SIZE",
    "SodiumAuthError",
    "SodiumChaCha20Poly1305",
    "available",
    "hmac_sha256",
    "load",
    "sha256",
    "x25519",
    "x25519_base",
]

TAG_SIZE = 16
NONCE_SIZE = 12
KEY_SIZE = 32
BULK_BYTES = 16 * 1024
"""Messages over this many bytes go to the ``bulk`` implementation if there is one, else to a
call that releases the GIL (as :data:`warden.channel.evp.BULK_BYTES`)."""
_LIBRARIES = ("libsodium.so.23", "libsodium.so")
_FIRST_BUFFER = 4096


class SodiumAuthError(Exception):
    """A message failed authentication."""


class _Loaded:
    lib: Any = None
    bulk: Any = None


def load() -> bool:
    """Load libsodium and initialise it once; False where it cannot be loaded."""
    if _Loaded.lib is not None:
        return True
    from warden.channel.evp import open_library

    loaded = open_library(_LIBRARIES)
    if loaded is None:
        return False
    lib = loaded[0]
    lib.sodium_init.restype = ctypes.c_int
    lib.sodium_init.argtypes = []
    if lib.sodium_init() < 0:  # 0: initialised, 1: it was already
        return False
    for each in loaded:
        _declare(each)
    _Loaded.lib, _Loaded.bulk = loaded
    return True


def available() -> bool:
    """Whether :func:`load` loaded it."""
    return _Loaded.lib is not None


def _declare(lib: Any) -> None:
    p, size, buf = ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p
    # int f(c|m out, unsigned long long *outlen (NULL), in, inlen, ad, adlen, nsec (NULL),
    #       npub, k): the encrypt takes (m, mlen) and writes c; the decrypt the reverse
    encrypt = lib.crypto_aead_chacha20poly1305_ietf_encrypt
    encrypt.restype = ctypes.c_int
    encrypt.argtypes = [p, p, buf, size, buf, size, p, buf, buf]
    decrypt = lib.crypto_aead_chacha20poly1305_ietf_decrypt
    decrypt.restype = ctypes.c_int
    decrypt.argtypes = [p, p, p, buf, size, buf, size, buf, buf]
    # The Noise handshake's primitives (warden.channel.noise): int f(out, in..., [key])
    for name, args in (
        ("crypto_scalarmult_curve25519_base", [p, buf]),
        ("crypto_scalarmult_curve25519", [p, buf, buf]),
        ("crypto_hash_sha256", [p, buf, size]),
        ("crypto_auth_hmacsha256", [p, buf, size, buf]),
    ):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = args


def x25519_base(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (RFC 7748; libsodium clamps it, as
    ``cryptography`` does): ``crypto_scalarmult_curve25519_base``."""
    out = ctypes.create_string_buffer(32)
    if _lib().crypto_scalarmult_curve25519_base(out, _bytes32(private)) != 0:
        raise ValueError("crypto_scalarmult_curve25519_base failed")
    return out.raw


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519(private, public) (RFC 7748): ``crypto_scalarmult_curve25519``. ValueError for a
    public key whose result is all zeros (a low-order point), which libsodium refuses, as
    ``cryptography`` does."""
    out = ctypes.create_string_buffer(32)
    if _lib().crypto_scalarmult_curve25519(out, _bytes32(private), _bytes32(public)) != 0:
        raise ValueError("the X25519 result is all zeros (a low-order public key)")
    return out.raw


def sha256(data: bytes) -> bytes:
    """SHA-256 (FIPS 180-4): ``crypto_hash_sha256``."""
    out = ctypes.create_string_buffer(32)
    data = bytes(data)
    _lib().crypto_hash_sha256(out, data, len(data))
    return out.raw


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256 (RFC 2104) with a 32-byte key: ``crypto_auth_hmacsha256``, whose key is
    ``crypto_auth_hmacsha256_KEYBYTES`` (32) long (Noise's HMAC keys are all HASHLEN, 32)."""
    out = ctypes.create_string_buffer(32)
    data = bytes(data)
    _lib().crypto_auth_hmacsha256(out, data, len(data), _bytes32(key))
    return out.raw


def _bytes32(value: bytes) -> bytes:
    if len(value) != 32:
        raise ValueError(f"expected 32 bytes, not {len(value)}")
    return bytes(value)


def _lib() -> Any:
    if _Loaded.lib is None:
        raise RuntimeError("libsodium is not loaded (call warden.channel.sodium.load())")
    return _Loaded.lib


class SodiumChaCha20Poly1305:
    """``encrypt``/``decrypt`` as ``cryptography``'s ``ChaCha20Poly1305``: the ciphertext with
    its 16-byte tag appended. Not thread-safe (one output buffer per object; each direction of
    a link has its own)."""

    __slots__ = ("_bulk", "_key", "_out")

    def __init__(self, key: bytes, bulk: _Aead | None = None) -> None:
        """``bulk``: another implementation of the same AEAD under the same key, for messages
        over :data:`BULK_BYTES` (OpenSSL's, faster on large messages in a TCG guest)."""
        if _Loaded.lib is None:
            raise RuntimeError("libsodium is not loaded (call warden.channel.sodium.load())")
        if len(key) != KEY_SIZE:
            raise ValueError(f"a ChaCha20-Poly1305 key is {KEY_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)
        self._bulk = bulk
        self._out = ctypes.create_string_buffer(_FIRST_BUFFER)

    def _buffer(self, size: int) -> ctypes.Array[ctypes.c_char]:
        if len(self._out) < size:
            self._out = ctypes.create_string_buffer(size)
        return self._out

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        if self._bulk is not None and len(data) > BULK_BYTES:
            return self._bulk.encrypt(nonce, data, associated_data)
        data, ad = bytes(data), bytes(associated_data)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        size = len(data) + TAG_SIZE
        out = self._buffer(size)
        lib = _Loaded.bulk if len(data) > BULK_BYTES else _Loaded.lib
        fn = lib.crypto_aead_chacha20poly1305_ietf_encrypt
        if fn(out, None, data, len(data), ad, len(ad), None, nonce, self._key) != 0:
            raise RuntimeError("crypto_aead_chacha20poly1305_ietf_encrypt failed")
        return memoryview(out)[:size].tobytes()

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        """The plaintext; :class:`SodiumAuthError` if the message does not authenticate (or the
        bulk implementation's error)."""
        if self._bulk is not None and len(data) > BULK_BYTES + TAG_SIZE:
            return self._bulk.decrypt(nonce, data, associated_data)
        data, ad = bytes(data), bytes(associated_data)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        if len(data) < TAG_SIZE:
            raise SodiumAuthError("shorter than a tag")
        size = len(data) - TAG_SIZE
        out = self._buffer(max(size, 1))
        lib = _Loaded.bulk if size > BULK_BYTES else _Loaded.lib
        fn = lib.crypto_aead_chacha20poly1305_ietf_decrypt
        if fn(out, None, None, data, len(data), ad, len(ad), nonce, self._key) != 0:
            raise SodiumAuthError("the message failed authentication")
        return memoryview(out)[:size].tobytes()
