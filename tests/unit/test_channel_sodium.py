"""Links' ChaCha20-Poly1305 through libsodium (``warden.channel.sodium``) gives the same bytes as
``cryptography``'s and refuses what ``cryptography`` refuses (make setup installs libsodium23 on
the host, as the guest image does)."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.channel import sodium
from warden.channel.sodium import BULK_BYTES, SodiumAuthError, SodiumChaCha20Poly1305


@pytest.fixture(autouse=True)
def _loaded() -> None:
    assert sodium.load(), "libsodium23 is not installed: run `make setup`"


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    data=st.binary(max_size=5000),
    ad=st.binary(max_size=100),
)
def test_the_same_bytes_as_cryptography(key: bytes, nonce: bytes, data: bytes, ad: bytes) -> None:
    ours, theirs = SodiumChaCha20Poly1305(key), ChaCha20Poly1305(key)
    sealed = ours.encrypt(nonce, data, ad)
    assert sealed == theirs.encrypt(nonce, data, ad)
    assert ours.decrypt(nonce, sealed, ad) == data
    assert theirs.decrypt(nonce, sealed, ad) == data


@pytest.mark.parametrize("size", [BULK_BYTES, BULK_BYTES + 1, 256 * 1024 - 16])
def test_bulk_sizes_release_the_gil_and_agree(size: int) -> None:
    key, nonce, data = os.urandom(32), os.urandom(12), os.urandom(size)
    ours = SodiumChaCha20Poly1305(key)
    sealed = ours.encrypt(nonce, data, b"\x00")
    assert sealed == ChaCha20Poly1305(key).encrypt(nonce, data, b"\x00")
    assert ours.decrypt(nonce, sealed, b"\x00") == data
    assert ours.encrypt(nonce, b"small", b"") == ChaCha20Poly1305(key).encrypt(nonce, b"small", b"")


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=500), where=st.integers(min_value=0))
def test_every_alteration_is_refused_like_cryptography(data: bytes, where: int) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    ours, theirs = SodiumChaCha20Poly1305(key), ChaCha20Poly1305(key)
    sealed = bytearray(ours.encrypt(nonce, data, b"ad"))
    sealed[where % len(sealed)] ^= 0x80
    with pytest.raises(SodiumAuthError):
        ours.decrypt(nonce, bytes(sealed), b"ad")
    with pytest.raises(InvalidTag):
        theirs.decrypt(nonce, bytes(sealed), b"ad")
    good = ours.encrypt(nonce, data, b"ad")
    with pytest.raises(SodiumAuthError):
        ours.decrypt(os.urandom(12), good, b"ad")  # another nonce
    with pytest.raises(SodiumAuthError):
        ours.decrypt(nonce, good, b"other")  # other associated data
    assert ours.decrypt(nonce, good, b"ad") == data


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SodiumChaCha20Poly1305(b"short")
    aead = SodiumChaCha20Poly1305(os.urandom(32))
    with pytest.raises(ValueError, match="12 bytes"):
        aead.encrypt(b"short", b"x", b"")
    with pytest.raises(ValueError, match="12 bytes"):
        aead.decrypt(b"short", bytes(32), b"")
    with pytest.raises(SodiumAuthError):
        aead.decrypt(bytes(12), b"tiny", b"")


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
