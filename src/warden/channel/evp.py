"""ChaCha20-Poly1305 (RFC 8439) through OpenSSL's EVP interface, one cipher context per key.

The guest agent uses this for the channel's records instead of ``cryptography``'s
``ChaCha20Poly1305``. Same library (OpenSSL's libcrypto, which ``cryptography`` itself calls),
same algorithm, same bytes on the wire; only the cost per call differs. Debian 12's
``cryptography`` 38 makes and frees a cipher context and sets the key up again for every
message: in a TCG guest that is 400-500 us per 64-byte record, against about 50 us here, where
the context is made once per key and each message only sets its nonce (measured in one guest,
one run). An exec costs two records in the guest, so this is most of the channel's overhead on
an exec.

The calls are OpenSSL's documented AEAD sequence (``EVP_EncryptInit_ex(3)``, "AEAD
Interface"): init with the nonce, update with the associated data (no output), update with the
data, final, then get the tag (encrypt) or set the expected tag before final (decrypt, where
final fails if the tag does not match). Nothing is written to a buffer that ctypes did not
size for it. Loaded with :func:`load`; :func:`available` says whether it was.

Calls hold the GIL (``ctypes.PyDLL``) except an update over more than :data:`BULK_BYTES`
(``ctypes.CDLL``, which releases it). A ``CDLL`` call releases and takes the GIL again, and
in a 1-vCPU guest whose other threads poll (a link's ring, ``guest/ring.py``) each release can
hand the GIL away for a while: a 64-byte record cost 185 us with ``CDLL`` against 98-118 us
with ``PyDLL`` (one guest, one run), and 357 us with a thread calling ``sched_yield`` beside
it. Holding the GIL over a large update would stall the agent's other threads instead.
"""

from __future__ import annotations

import ctypes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["TAG_SIZE", "EvpAuthError", "EvpChaCha20Poly1305", "available", "load", "open_library"]

TAG_SIZE = 16
NONCE_SIZE = 12
KEY_SIZE = 32
_CTRL_AEAD_GET_TAG = 0x10
_CTRL_AEAD_SET_TAG = 0x11
_LIBRARIES = ("libcrypto.so.3", "libcrypto.so")
_FIRST_BUFFER = 4096
"""The output buffer a context starts with; it grows to the largest message it ran."""
BULK_BYTES = 16 * 1024
"""Updates over this many bytes release the GIL meanwhile; shorter calls keep it."""


class _Loaded:
    lib: Any = None
    """libcrypto, once :func:`load` loaded it, called with the GIL held (``PyDLL``)."""
    bulk: Any = None
    """The same library through ``CDLL``: its calls release the GIL (large updates)."""


class EvpAuthError(Exception):
    """A ciphertext failed authentication (or OpenSSL refused the call)."""


def load() -> bool:
    """Load libcrypto and declare the functions used; False if it cannot be loaded."""
    if _Loaded.lib is not None:
        return True
    loaded = open_library(_LIBRARIES)
    if loaded is None:
        return False
    for lib in loaded:
        _declare(lib)
    _Loaded.lib, _Loaded.bulk = loaded
    return True


def open_library(names: tuple[str, ...]) -> tuple[Any, Any] | None:
    """The first of ``names`` that loads, opened twice: as ``ctypes.PyDLL`` (its calls keep the
    GIL) and as ``ctypes.CDLL`` (its calls release it); None if none loads."""
    for name in names:
        try:
            return ctypes.PyDLL(name), ctypes.CDLL(name)
        except OSError:
            continue
    return None


def available() -> bool:
    return _Loaded.lib is not None


def _declare(lib: Any) -> None:
    p, i, buf = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    lib.EVP_CIPHER_CTX_new.restype = p
    lib.EVP_CIPHER_CTX_new.argtypes = []
    lib.EVP_CIPHER_CTX_free.restype = None
    lib.EVP_CIPHER_CTX_free.argtypes = [p]
    lib.EVP_chacha20_poly1305.restype = p
    lib.EVP_chacha20_poly1305.argtypes = []
    lib.EVP_CipherInit_ex.restype = i
    lib.EVP_CipherInit_ex.argtypes = [p, p, p, buf, buf, i]
    lib.EVP_CipherUpdate.restype = i
    lib.EVP_CipherUpdate.argtypes = [p, p, ctypes.POINTER(i), p, i]  # in: bytes or a buffer
    lib.EVP_CipherFinal_ex.restype = i
    lib.EVP_CipherFinal_ex.argtypes = [p, p, ctypes.POINTER(i)]
    lib.EVP_CIPHER_CTX_ctrl.restype = i
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [p, i, i, p]


class EvpChaCha20Poly1305:
    """``encrypt``/``decrypt`` like ``cryptography``'s ChaCha20Poly1305, on one EVP context.

    Not thread-safe: each of the channel's CipherStates has its own (one direction each)."""

    __slots__ = ("__weakref__", "_ctx", "_finalizer", "_out", "_outl", "_tag")

    def __init__(self, key: bytes) -> None:
        import weakref

        lib = _Loaded.lib
        if lib is None:
            raise RuntimeError("libcrypto is not loaded (call warden.channel.evp.load())")
        if len(key) != KEY_SIZE:
            raise ValueError(f"a ChaCha20-Poly1305 key is {KEY_SIZE} bytes, not {len(key)}")
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._ctx = ctypes.c_void_p(ctx)
        self._finalizer = weakref.finalize(self, lib.EVP_CIPHER_CTX_free, self._ctx)
        if lib.EVP_CipherInit_ex(self._ctx, lib.EVP_chacha20_poly1305(), None, key, None, 1) != 1:
            raise RuntimeError("EVP_CipherInit_ex refused the ChaCha20-Poly1305 key")
        # Made once and reused by every message (one thread per context): under TCG, making a
        # buffer, a c_int and a byref for each call cost twice OpenSSL's own work on a
        # 64-byte record (127 us a call against 42 us for the five calls alone, one guest).
        self._outl = ctypes.c_int(0)
        self._tag = ctypes.create_string_buffer(TAG_SIZE)
        self._out = ctypes.create_string_buffer(_FIRST_BUFFER)

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        """The ciphertext of ``data`` followed by its 16-byte tag."""
        data = bytes(data)
        written = self._run(nonce, data, bytes(associated_data), 1)
        out = self._out
        tag = ctypes.byref(out, written)
        if _Loaded.lib.EVP_CIPHER_CTX_ctrl(self._ctx, _CTRL_AEAD_GET_TAG, TAG_SIZE, tag) != 1:
            raise RuntimeError("EVP_CTRL_AEAD_GET_TAG failed")
        return memoryview(out)[: written + TAG_SIZE].tobytes()

    def encrypt_into(
        self, nonce: bytes, source: int, length: int, out: ctypes.Array[ctypes.c_char], offset: int
    ) -> None:
        """Encrypt ``length`` bytes at address ``source`` (no associated data) into ``out`` at
        ``offset``: the ciphertext, then its tag. ``out`` must hold ``length + TAG_SIZE`` bytes
        from there (checked)."""
        lib, ctx = _Loaded.lib, self._ctx
        if len(nonce) != NONCE_SIZE or offset < 0 or offset + length + TAG_SIZE > len(out):
            raise ValueError("encrypt_into: a bad nonce, or out is too small")
        if lib.EVP_CipherInit_ex(ctx, None, None, None, nonce, 1) != 1:
            raise RuntimeError("EVP_CipherInit_ex refused the nonce")
        outl = ctypes.c_int(0)
        written = 0
        if length:
            update = _update(length)
            if update(ctx, ctypes.byref(out, offset), ctypes.byref(outl), source, length) != 1:
                raise RuntimeError("EVP_CipherUpdate failed")
            written = outl.value
        if (
            lib.EVP_CipherFinal_ex(ctx, ctypes.byref(out, offset + written), ctypes.byref(outl))
            != 1
        ):
            raise RuntimeError("EVP_CipherFinal_ex failed")
        written += outl.value
        if written != length:
            raise RuntimeError(f"EVP wrote {written} bytes for {length}")
        tag = ctypes.byref(out, offset + length)
        if lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_GET_TAG, TAG_SIZE, tag) != 1:
            raise RuntimeError("EVP_CTRL_AEAD_GET_TAG failed")

    def verify(self, nonce: bytes, tag: bytes, associated_data: memoryview) -> bool:
        """Whether ``tag`` authenticates ``associated_data`` (an empty plaintext), which is read
        in place (a writable buffer, such as a view of an mmap): no copy of it is made."""
        if len(tag) != TAG_SIZE:
            return False
        view = memoryview(associated_data)
        ad = (ctypes.c_char * len(view)).from_buffer(view) if view else b""
        try:
            self._run(nonce, b"", ad, 0, tag)
        except EvpAuthError:
            return False
        return True

    def tag(self, nonce: bytes, associated_data: memoryview) -> bytes:
        """The tag of ``associated_data`` with an empty plaintext, read in place (a writable
        buffer, such as a view of an mmap): no copy of it is made."""
        view = memoryview(associated_data)
        ad = (ctypes.c_char * len(view)).from_buffer(view) if view else b""
        self._run(nonce, b"", ad, 1)
        tag = self._tag
        if _Loaded.lib.EVP_CIPHER_CTX_ctrl(self._ctx, _CTRL_AEAD_GET_TAG, TAG_SIZE, tag) != 1:
            raise RuntimeError("EVP_CTRL_AEAD_GET_TAG failed")
        return tag.raw

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        """The plaintext of ``data`` (ciphertext then tag); EvpAuthError if it does not
        authenticate."""
        data = bytes(data)
        if len(data) < TAG_SIZE:
            raise EvpAuthError("shorter than a tag")
        body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        written = self._run(nonce, body, bytes(associated_data), 0, tag)
        return memoryview(self._out)[:written].tobytes()

    def _run(
        self,
        nonce: bytes,
        data: bytes,
        ad: bytes | ctypes.Array[ctypes.c_char],
        enc: int,
        tag: bytes = b"",
    ) -> int:
        """Run one message into ``self._out`` (grown to hold it and a tag); its length."""
        lib, ctx, outl = _Loaded.lib, self._ctx, self._outl
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        if lib.EVP_CipherInit_ex(ctx, None, None, None, nonce, enc) != 1:
            raise RuntimeError("EVP_CipherInit_ex refused the nonce")
        if ad and _update(len(ad))(ctx, None, outl, ad, len(ad)) != 1:
            raise RuntimeError("EVP_CipherUpdate refused the associated data")
        size = len(data)
        if len(self._out) < size + TAG_SIZE:  # a stream cipher: size bytes, then the tag
            self._out = ctypes.create_string_buffer(size + TAG_SIZE)
        out = self._out
        written = 0
        if size:
            if _update(size)(ctx, out, outl, data, size) != 1:
                raise RuntimeError("EVP_CipherUpdate failed")
            written = outl.value
        written += self._final(out, written, tag)
        if written != size:
            raise RuntimeError(f"EVP wrote {written} bytes for {size}")
        return written

    def _final(self, out: ctypes.Array[ctypes.c_char], written: int, tag: bytes) -> int:
        """Finish the message (checking ``tag`` if decrypting); the bytes it wrote."""
        lib, ctx, outl = _Loaded.lib, self._ctx, self._outl
        # OpenSSL copies the expected tag out of the (read-only) bytes.
        if tag and lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_SET_TAG, TAG_SIZE, tag) != 1:
            raise RuntimeError("EVP_CTRL_AEAD_SET_TAG failed")
        end = ctypes.byref(out, written) if written else out
        if lib.EVP_CipherFinal_ex(ctx, end, outl) != 1:
            if tag:
                raise EvpAuthError("the message failed authentication")
            raise RuntimeError("EVP_CipherFinal_ex failed")
        return outl.value


def _update(size: int) -> Any:
    """``EVP_CipherUpdate`` for ``size`` bytes: releasing the GIL only for a large one."""
    return (_Loaded.bulk if size > BULK_BYTES else _Loaded.lib).EVP_CipherUpdate
