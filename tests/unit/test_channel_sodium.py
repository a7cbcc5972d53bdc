"""Links' ChaCha20-Poly1305 through libsodium (``warden.channel.sodium``): large messages and the
hand-off to a bulk implementation (its bytes and refusals against ``cryptography``'s:
tests/unit/test_aead_backends.py; make setup installs libsodium23 on the host, as the guest
image does)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

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
