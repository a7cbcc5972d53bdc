"""libsodium through ctypes (``warden.channel.sodium``): links' ChaCha20-Poly1305, its large
messages and the hand-off to a bulk implementation (its bytes and refusals against
``cryptography``'s: tests/unit/test_aead_backends.py), and the primitives of the guest's Noise
handshake against ``cryptography``'s and hashlib's (the Noise vectors run on them too:
tests/unit/test_noise_vectors.py). make setup installs libsodium23 on the host, as the guest
image does."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.channel import sodium
from warden.channel.sodium import BULK_BYTES, SodiumChaCha20Poly1305


@pytest.fixture(autouse=True)
def _loaded() -> None:
    assert sodium.load(), "libsodium23 is not installed: run `make setup`"


@pytest.mark.parametrize("size", [BULK_BYTES, BULK_BYTES + 1, 256 * 1024 - 16])
def test_bulk_sizes_release_the_gil_and_agree(size: int) -> None:
    key, nonce, data = os.urandom(32), os.urandom(12), os.urandom(size)
    ours = SodiumChaCha20Poly1305(key)
    sealed = ours.encrypt(nonce, data, b"\x00")
    assert sealed == ChaCha20Poly1305(key).encrypt(nonce, data, b"\x00")
    assert ours.decrypt(nonce, sealed, b"\x00") == data
    assert ours.encrypt(nonce, b"small", b"") == ChaCha20Poly1305(key).encrypt(nonce, b"small", b"")


class _Spy:
    """A bulk implementation that counts its calls."""

    def __init__(self, key: bytes) -> None:
        self.inner = ChaCha20Poly1305(key)
        self.calls = 0

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        self.calls += 1
        return self.inner.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        self.calls += 1
        return self.inner.decrypt(nonce, data, associated_data)


def test_messages_over_the_bulk_size_go_to_the_bulk_implementation() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    spy = _Spy(key)
    ours, theirs = SodiumChaCha20Poly1305(key, bulk=spy), ChaCha20Poly1305(key)
    for size, bulk_calls in ((BULK_BYTES, 0), (BULK_BYTES + 1, 2)):
        data = os.urandom(size)
        sealed = ours.encrypt(nonce, data, b"ad")
        assert sealed == theirs.encrypt(nonce, data, b"ad")
        assert ours.decrypt(nonce, sealed, b"ad") == data
        assert spy.calls == bulk_calls


# -- the Noise handshake's primitives (warden.channel.noise on libsodium, the guest's)


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), data=st.binary(max_size=300))
def test_sha256_and_hmac_agree_with_hashlib(key: bytes, data: bytes) -> None:
    assert sodium.load()
    assert sodium.sha256(data) == hashlib.sha256(data).digest()
    assert sodium.hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


@settings(max_examples=30, deadline=None)
@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_x25519_agrees_with_cryptography(a: bytes, b: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    assert sodium.load()
    key_a = X25519PrivateKey.from_private_bytes(a)
    public_a = key_a.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert sodium.x25519_base(a) == public_a
    public_b = sodium.x25519_base(b)
    shared = key_a.exchange(X25519PublicKey.from_public_bytes(public_b))
    assert sodium.x25519(a, public_b) == shared == sodium.x25519(b, public_a)


def test_a_low_order_public_key_fails_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """An all-zero X25519 result is refused (RFC 7748 section 6.1), as ``cryptography`` does:
    a responder on libsodium given a first message whose ephemeral key is a low-order point
    (here 0) fails with ChannelError, not with a session under a predictable key."""
    from warden.channel import noise
    from warden.channel.errors import ChannelError

    assert sodium.load()
    with pytest.raises(ValueError, match="all zeros"):
        sodium.x25519(bytes(range(32)), bytes(32))
    monkeypatch.setattr(noise._Backend, "sodium", sodium)
    responder = noise.HandshakeState(initiator=False, psk=None, pattern="NN")
    responder.read_message(bytes(32))  # "e": its ephemeral key is 0
    with pytest.raises(ChannelError, match="ephemeral public key is invalid"):
        responder.write_message()  # "ee": DH with it


def test_a_host_on_cryptography_and_a_guest_on_libsodium_agree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The channel as it runs: the host's handshake on cryptography and hashlib, the agent's
    on libsodium; both end with the same session keys and handshake hash."""
    from warden.channel import noise

    assert sodium.load()
    psk = bytes(range(32))
    host = noise.HandshakeState(initiator=True, psk=psk, prologue=b"p")
    guest = noise.HandshakeState(initiator=False, psk=psk, prologue=b"p")
    first = host.write_message()
    monkeypatch.setattr(noise._Backend, "sodium", sodium)
    guest.read_message(first)
    second = guest.write_message()
    guest_send, guest_recv = guest.split()[1], guest.split()[0]
    monkeypatch.setattr(noise._Backend, "sodium", None)
    host.read_message(second)
    assert host.handshake_hash == guest.handshake_hash
    host_send, host_recv = host.split()
    assert guest_recv.decrypt_with_ad(b"", host_send.encrypt_with_ad(b"", b"hello")) == b"hello"
    assert host_recv.decrypt_with_ad(b"", guest_send.encrypt_with_ad(b"", b"back")) == b"back"
