"""The guest's ctypes ChaCha20-Poly1305 backends, OpenSSL's EVP (``warden.channel.evp``: the
channel, large link records) and libsodium (``warden.channel.sodium``: small link records), each
give the same bytes as ``cryptography``'s and refuse what ``cryptography`` refuses. Make setup
installs libcrypto and libsodium23 on the host, as the guest image does."""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.channel import evp, sodium

BACKENDS = {
    "evp": (evp, evp.EvpChaCha20Poly1305, evp.EvpAuthError),
    "sodium": (sodium, sodium.SodiumChaCha20Poly1305, sodium.SodiumAuthError),
}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[Any, type[Exception]]:
    """(the AEAD class, its authentication error), its library loaded."""
    module, aead, error = BACKENDS[request.param]
    assert module.load(), f"{request.param}'s library is not installed: run `make setup`"
    return aead, error


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    data=st.binary(max_size=5000),
    ad=st.binary(max_size=100),
)
def test_the_same_bytes_as_cryptography(
    backend: tuple[Any, type[Exception]], key: bytes, nonce: bytes, data: bytes, ad: bytes
) -> None:
    ours, theirs = backend[0](key), ChaCha20Poly1305(key)
    sealed = ours.encrypt(nonce, data, ad)
    assert sealed == theirs.encrypt(nonce, data, ad)
    assert ours.decrypt(nonce, sealed, ad) == data
    assert theirs.decrypt(nonce, sealed, ad) == data


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=500), where=st.integers(min_value=0))
def test_every_alteration_is_refused_like_cryptography(
    backend: tuple[Any, type[Exception]], data: bytes, where: int
) -> None:
    aead, error = backend
    key, nonce = os.urandom(32), os.urandom(12)
    ours, theirs = aead(key), ChaCha20Poly1305(key)
    sealed = bytearray(ours.encrypt(nonce, data, b"ad"))
    sealed[where % len(sealed)] ^= 0x80
    with pytest.raises(error):
        ours.decrypt(nonce, bytes(sealed), b"ad")
    with pytest.raises(InvalidTag):
        theirs.decrypt(nonce, bytes(sealed), b"ad")
    good = ours.encrypt(nonce, data, b"ad")
    with pytest.raises(error):
        ours.decrypt(os.urandom(12), good, b"ad")  # another nonce
    with pytest.raises(error):
        ours.decrypt(nonce, good, b"other")  # other associated data
    assert ours.decrypt(nonce, good, b"ad") == data  # the context survives a failure


def test_bad_sizes_are_refused(backend: tuple[Any, type[Exception]]) -> None:
    aead_class, error = backend
    with pytest.raises(ValueError, match="32 bytes"):
        aead_class(b"short")
    aead = aead_class(os.urandom(32))
    with pytest.raises(ValueError, match="12 bytes"):
        aead.encrypt(b"short", b"x", b"")
    with pytest.raises(ValueError, match="12 bytes"):
        aead.decrypt(b"short", bytes(32), b"")
    with pytest.raises(error):
        aead.decrypt(bytes(12), b"tiny", b"")
