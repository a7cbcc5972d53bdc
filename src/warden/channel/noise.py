"""The Noise Protocol Framework for ``Noise_NNpsk0_25519_ChaChaPoly_SHA256``.

An implementation of the processing rules of the Noise specification, revision 34 (2018-07-11,
https://noiseprotocol.org/noise.html), for one set of functions: X25519 (section 12.1),
ChaCha20-Poly1305 (section 12.3) and SHA-256 (section 12.5). Section numbers in the comments
below are that document's. The objects and their methods are the spec's own (section 5):
:class:`CipherState`, :class:`SymmetricState` and :class:`HandshakeState`.

The channel uses the pattern ``NNpsk0`` (sections 7.5 and 9.4)::

    NNpsk0:
      -> psk, e
      <- e, ee

:data:`PATTERNS` also holds ``NN`` and ``NNpsk2``: they use the same tokens and exist only so
that the published test vectors of those patterns check this code too.

The primitives are the audited ones of ``cryptography`` (X25519, ChaCha20-Poly1305) and the
standard library's ``hashlib``/``hmac`` (SHA-256, HMAC); only APIs that
``cryptography`` 38 (Debian 12's ``python3-cryptography``, which the guest runs) has are used,
and ``cryptography`` is imported on first use. The guest runs its handshake on libsodium's
instead (:func:`use_sodium`, :mod:`.sodium`): the same functions and bytes (the test vectors
run on both), in far less code than OpenSSL 3's provider layers, which TCG translates afresh
in every new QEMU before a clone's first handshake (5,352 translated blocks of libcrypto in a
clone's launch with OpenSSL, 284 of libsodium and 1,242 of libcrypto's records with it; the
launch 0.26 -> 0.22 s). The session's records stay on :mod:`.evp`. No I/O: the caller moves
the bytes.

Every failure caused by a message (an authentication failure, a short message, an invalid
public key) raises :class:`~warden.channel.errors.ChannelError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from warden.channel.errors import ChannelError

# Not ``typing.TYPE_CHECKING``: importing typing is slow in the guest (see wire/frame.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from warden.channel.evp import EvpChaCha20Poly1305
    from warden.channel.sodium import SodiumChaCha20Poly1305

__all__ = [
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "PATTERNS",
    "PSK_SIZE",
    "TAG_SIZE",
    "CipherState",
    "HandshakeState",
    "SymmetricState",
    "hkdf",
    "protocol_name",
]

DHLEN = 32  # section 12.1
HASHLEN = 32  # section 12.5 (SHA256; BLOCKLEN 64 is hashlib's and hmac's business)
KEY_SIZE = 32  # section 4.2: cipher keys are 32 bytes
TAG_SIZE = 16  # section 4.2: a ciphertext is its plaintext plus 16 bytes
PSK_SIZE = 32  # section 9.2: a psk is a 32-byte secret
MAX_MESSAGE = 65535  # section 3: every Noise message is at most 65535 bytes
MAX_NONCE = (1 << 64) - 1  # section 5.1: reserved, never used to encrypt a message

# Section 12.3: the 96-bit ChaChaPoly nonce is 32 bits of zeros, then n as a little-endian u64.
_NONCE = struct.Struct("<4xQ")
_ZEROS = bytes(32)

PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    # Section 9.4: psk0 puts a "psk" token first in the first message; psk2 last in the second.
    "NNpsk0": (("psk", "e"), ("e", "ee")),
    # The two below run only against the published test vectors.
    "NN": (("e",), ("e", "ee")),  # section 7.5
    "NNpsk2": (("e",), ("e", "ee", "psk")),  # section 9.4
}
"""The handshake patterns (section 7) this module runs: their message patterns, in order."""


def protocol_name(pattern: str) -> bytes:
    """The protocol name of section 8 for ``pattern`` with this module's functions."""
    return f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode("ascii")


def _hash(data: bytes) -> bytes:
    """HASH() of section 4.3: SHA-256 (section 12.5)."""
    if _Backend.sodium is not None:
        return bytes(_Backend.sodium.sha256(data))
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-HASH() of section 4.3: HMAC (RFC 2104) with SHA-256 (its keys here are all
    HASHLEN long: chaining keys and HKDF's temp_key)."""
    if _Backend.sodium is not None and len(key) == HASHLEN:
        return bytes(_Backend.sodium.hmac_sha256(key, data))
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF() of section 4.3: two or three outputs of HASHLEN bytes each."""
    temp_key = _hmac(chaining_key, input_key_material)
    output1 = _hmac(temp_key, b"\x01")
    output2 = _hmac(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    output3 = _hmac(temp_key, output2 + b"\x03")
    return output1, output2, output3


class _Backend:
    evp = False
    """Whether ChaCha20-Poly1305 runs through :mod:`.evp` (see :func:`use_evp`)."""
    sodium: ModuleType | None = None
    """:mod:`.sodium`, loaded, when the handshake runs on libsodium (see :func:`use_sodium`)."""


def use_sodium() -> bool:
    """Run the handshake's primitives (X25519, SHA-256, HMAC, and its ChaCha20-Poly1305) on
    libsodium (:mod:`.sodium`) from now on, where it loads: the guest's. The same functions,
    the same bytes (the test vectors run on both); far less code than OpenSSL 3's provider
    layers, which a new QEMU under TCG must translate before a clone's first handshake."""
    from warden.channel import sodium  # ctypes: imported when asked, not with this module

    _Backend.sodium = sodium if sodium.load() else None
    return _Backend.sodium is not None


def use_evp() -> bool:
    """Run ChaCha20-Poly1305 through :mod:`.evp` (one OpenSSL context per key) from now on;
    False if libcrypto cannot be loaded (``cryptography`` stays in use). The guest agent calls
    it: ``cryptography`` 38 costs it ten times more per record (see :mod:`.evp`)."""
    from warden.channel import evp

    _Backend.evp = evp.load()
    return _Backend.evp


def _aead(
    key: bytes, handshake: bool = False
) -> ChaCha20Poly1305 | EvpChaCha20Poly1305 | SodiumChaCha20Poly1305:
    if handshake and _Backend.sodium is not None:
        aead: SodiumChaCha20Poly1305 = _Backend.sodium.SodiumChaCha20Poly1305(key)
        return aead
    if _Backend.evp:
        from warden.channel.evp import EvpChaCha20Poly1305

        return EvpChaCha20Poly1305(key)
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


class CipherState:
    """Section 5.1: a cipher key ``k`` (or none yet) and a 64-bit nonce counter ``n``."""

    __slots__ = ("_aead", "_handshake", "_key", "n")

    def __init__(self, key: bytes | None = None, *, handshake: bool = False) -> None:
        """``handshake``: a SymmetricState's, which encrypts handshake payloads only."""
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | EvpChaCha20Poly1305 | SodiumChaCha20Poly1305 | None = None
        self._handshake = handshake
        self.n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """InitializeKey(key): ``k = key`` (None is the spec's ``empty``), ``n = 0``."""
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError(f"a cipher key is {KEY_SIZE} bytes, not {len(key)}")
        self._key = key
        self._aead = None if key is None else _aead(key, self._handshake)
        self.n = 0

    def has_key(self) -> bool:
        """HasKey()."""
        return self._key is not None

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(nonce) (section 11.4; the channel never calls it)."""
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce {nonce} is not a 64-bit unsigned integer")
        self.n = nonce

    def _next_nonce(self) -> bytes:
        # Section 5.1: n = 2^64-1 is reserved; reaching it ends the CipherState (section 14:
        # nonces never wrap).
        if self.n >= MAX_NONCE:
            raise ChannelError("the nonce counter is exhausted: a new handshake is needed")
        return _NONCE.pack(self.n)

    @property
    def evp(self) -> EvpChaCha20Poly1305 | None:
        """The key's EVP cipher, when records run through :mod:`.evp` (see :func:`use_evp`)."""
        from warden.channel.evp import EvpChaCha20Poly1305

        return self._aead if isinstance(self._aead, EvpChaCha20Poly1305) else None

    def take_nonce(self) -> bytes:
        """The nonce for the next message, counted as used (n++): for a caller that encrypts
        with :attr:`evp` itself, exactly as :meth:`encrypt_with_ad` would with that nonce."""
        nonce = self._next_nonce()
        self.n += 1
        return nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd(ad, plaintext): ENCRYPT(k, n++, ad, plaintext), or the plaintext."""
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._next_nonce(), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd(ad, ciphertext): DECRYPT(k, n++, ad, ciphertext), or the ciphertext.

        On an authentication failure ``n`` is not incremented and ChannelError is raised."""
        if self._aead is None:
            return bytes(ciphertext)
        from cryptography.exceptions import InvalidTag

        from warden.channel.evp import EvpAuthError
        from warden.channel.sodium import SodiumAuthError

        try:
            plaintext = self._aead.decrypt(self._next_nonce(), ciphertext, ad)
        except (InvalidTag, EvpAuthError, SodiumAuthError):
            raise ChannelError("a message failed authentication") from None
        self.n += 1
        return plaintext

    def rekey(self) -> None:
        """Rekey() (sections 4.2 and 11.3): k = the first 32 bytes of
        ENCRYPT(k, maxnonce, zerolen, zeros). ``n`` is kept."""
        if self._aead is None:
            raise ValueError("a CipherState without a key cannot be rekeyed")
        n = self.n
        self.initialize_key(self._aead.encrypt(_NONCE.pack(MAX_NONCE), _ZEROS, b"")[:KEY_SIZE])
        self.n = n


class SymmetricState:
    """Section 5.2: a CipherState plus the chaining key ``ck`` and the handshake hash ``h``."""

    __slots__ = ("cipher_state", "ck", "h")

    def __init__(self, name: bytes) -> None:
        """InitializeSymmetric(protocol_name)."""
        if len(name) <= HASHLEN:
            self.h = name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(name)
        self.ck = self.h
        self.cipher_state = CipherState(handshake=True)

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(): ck, temp_k = HKDF(ck, ikm, 2); InitializeKey(temp_k).

        (HASHLEN is 32, so temp_k needs no truncation.)"""
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        """MixHash(): h = HASH(h || data)."""
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash() (section 9.1): ck, temp_h, temp_k = HKDF(ck, ikm, 3)."""
        self.ck, temp_h, temp_k = hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        """GetHandshakeHash(): ``h``, for channel binding (section 11.2)."""
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(): the ciphertext, with ``h`` as associated data, mixed into ``h``."""
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(): the plaintext; the ciphertext is mixed into ``h``."""
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Split(): (initiator-to-responder, responder-to-initiator) CipherStates."""
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return CipherState(temp_k1), CipherState(temp_k2)


def _generate_keypair(private: bytes | None) -> tuple[X25519PrivateKey | bytes, bytes]:
    """GENERATE_KEYPAIR() of section 12.1: (private key, raw public key); the private key is
    its raw bytes on libsodium."""
    # From the kernel's RNG (os.urandom), not OpenSSL's user-space one: in a VM restored from
    # a snapshot, the agent's process (and its OpenSSL RNG state) is a copy of every other
    # clone's, while the guest kernel's RNG is reseeded before each handshake (guest/pid1.py).
    raw = os.urandom(DHLEN) if private is None else private
    if _Backend.sodium is not None:
        return raw, bytes(_Backend.sodium.x25519_base(raw))
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.from_private_bytes(raw)
    # public_bytes_raw() is newer than cryptography 38.
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey | bytes, public: bytes) -> bytes:
    """DH() of section 12.1 (X25519, RFC 7748).

    ``cryptography`` and libsodium refuse a public key whose result is all zeros (a low-order
    point): section 12.1 allows signalling an error for it, which is a ChannelError here."""
    try:
        if isinstance(private, bytes):  # made on libsodium (_generate_keypair)
            from warden.channel import sodium

            return sodium.x25519(private, public)
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise ChannelError("the peer's ephemeral public key is invalid") from None


class HandshakeState:
    """Section 5.3: one side of a handshake; ``PATTERNS[pattern]`` gives its messages.

    ``psk`` is the 32-byte pre-shared key (section 9) of a psk pattern, None for ``NN``.
    ``prologue`` (section 6) is data both sides must hold the same, or the handshake fails.

    ``ephemeral`` fixes the ephemeral private key instead of generating one: for the test
    vectors, and for :class:`~warden.channel.transport.Initiator`, which replays its own first
    message to read a second candidate answer with a fresh state (a key it made with
    ``os.urandom`` for that one session). A fixed key used for two sessions would make them one
    session: a caller must never reuse one.

    After the last message, :meth:`split` gives the transport CipherStates and
    :attr:`handshake_hash` the channel binding value (section 11.2). Any error leaves the
    object dead (section 5.3: the HandshakeState is deleted).
    """

    __slots__ = (
        "_e",
        "_e_given",
        "_error",
        "_index",
        "_messages",
        "_psk",
        "_re",
        "_split",
        "_ss",
        "initiator",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        psk: bytes | None,
        prologue: bytes = b"",
        pattern: str = "NNpsk0",
        ephemeral: bytes | None = None,
    ) -> None:
        messages = PATTERNS.get(pattern)
        if messages is None:
            raise ValueError(f"unknown handshake pattern {pattern!r}")
        _check_psk(pattern, psk)
        self.initiator = initiator
        self._psk = psk
        self._messages = messages
        self._index = 0  # of the next message pattern
        self._e_given = ephemeral
        self._e: X25519PrivateKey | bytes | None = None
        self._re: bytes | None = None
        self._split: tuple[CipherState, CipherState] | None = None
        self._error: str | None = None
        # Section 5.3 Initialize(): InitializeSymmetric(protocol_name), MixHash(prologue).
        # NN patterns have no pre-messages.
        self._ss = SymmetricState(protocol_name(pattern))
        self._ss.mix_hash(prologue)

    @property
    def finished(self) -> bool:
        """Whether the last message was written or read."""
        return self._split is not None

    @property
    def handshake_hash(self) -> bytes:
        """GetHandshakeHash() (section 11.2): unique to this session; only once finished."""
        self._check_finished()
        return self._ss.get_handshake_hash()

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates: (initiator-to-responder, responder-to-initiator)."""
        self._check_finished()
        assert self._split is not None
        return self._split

    def _check_finished(self) -> None:
        if self._split is None:
            raise RuntimeError("the handshake is not finished")

    def _next_pattern(self, writing: bool) -> tuple[str, ...]:
        """Fetch and delete the next message pattern (section 5.3), checking whose turn it is:
        the initiator writes the even messages, the responder the odd ones."""
        if self._error is not None:
            raise ChannelError(f"the handshake already failed: {self._error}")
        if self._index >= len(self._messages):
            raise RuntimeError("the handshake is already finished")
        sent_by_initiator = self._index % 2 == 0  # the two sides take turns (section 7.1)
        if sent_by_initiator != (writing == self.initiator):
            raise RuntimeError(f"it is not this side's turn to {'write' if writing else 'read'}")
        self._index += 1
        return self._messages[self._index - 1]

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage(payload) of section 5.3: the handshake message to send."""
        tokens = self._next_pattern(writing=True)
        try:
            message = self._write(tokens, payload)
        except ChannelError as exc:
            self._error = str(exc)
            raise
        if len(message) > MAX_MESSAGE:  # section 3
            self._error = "message too long"
            raise ValueError(f"a handshake message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        self._finish_if_last()
        return message

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message) of section 5.3: the payload of a received handshake message."""
        tokens = self._next_pattern(writing=False)
        try:
            if len(message) > MAX_MESSAGE:  # section 3
                raise ChannelError(f"a handshake message of {len(message)} bytes is too long")
            payload = self._read(tokens, bytes(message))
        except ChannelError as exc:
            self._error = str(exc)
            raise
        self._finish_if_last()
        return payload

    def _finish_if_last(self) -> None:
        """Section 5.3: after the last message pattern, Split()."""
        if self._index == len(self._messages):
            self._split = self._ss.split()

    def _write(self, tokens: tuple[str, ...], payload: bytes) -> bytes:
        out: list[bytes] = []
        for tok in tokens:
            if tok == "e":
                # Sets e to GENERATE_KEYPAIR(); appends e.public_key; MixHash(e.public_key).
                if self._e is not None:
                    raise RuntimeError("e must be empty before an e token")
                self._e, public = _generate_keypair(self._e_given)
                out.append(public)
                self._mix_e(public)
            else:
                self._mix_token(tok)
        out.append(self._ss.encrypt_and_hash(payload))
        return b"".join(out)

    def _read(self, tokens: tuple[str, ...], message: bytes) -> bytes:
        pos = 0
        for tok in tokens:
            if tok == "e":
                # Sets re to the next DHLEN bytes; MixHash(re.public_key).
                if len(message) - pos < DHLEN:
                    raise ChannelError("the handshake message is too short")
                self._re = message[pos : pos + DHLEN]
                pos += DHLEN
                self._mix_e(self._re)
            else:
                self._mix_token(tok)
        rest = message[pos:]
        if self._ss.cipher_state.has_key() and len(rest) < TAG_SIZE:
            raise ChannelError("the handshake message is too short")
        try:
            return self._ss.decrypt_and_hash(rest)
        except ChannelError:
            raise ChannelError("the handshake message failed authentication") from None

    def _mix_e(self, public: bytes) -> None:
        self._ss.mix_hash(public)
        if self._psk is not None:
            # Section 9.2: in a PSK handshake every MixHash(e.public_key) is followed by
            # MixKey(e.public_key).
            self._ss.mix_key(public)

    def _mix_token(self, token: str) -> None:
        handlers: dict[str, Callable[[], None]] = {"ee": self._ee, "psk": self._psk_token}
        handlers[token]()

    def _ee(self) -> None:
        """Section 5.3 "ee": MixKey(DH(e, re))."""
        e, re = self._e, self._re
        if e is None or re is None:
            raise RuntimeError("an ee token before both ephemeral keys")
        self._ss.mix_key(_dh(e, re))

    def _psk_token(self) -> None:
        """Section 9.2 "psk": MixKeyAndHash(psk)."""
        assert self._psk is not None
        self._ss.mix_key_and_hash(self._psk)


def _check_psk(pattern: str, psk: bytes | None) -> None:
    wants_psk = any("psk" in message for message in PATTERNS[pattern])
    if wants_psk and (psk is None or len(psk) != PSK_SIZE):
        raise ValueError(f"{pattern} needs a {PSK_SIZE}-byte psk")
    if not wants_psk and psk is not None:
        raise ValueError(f"{pattern} takes no psk")
