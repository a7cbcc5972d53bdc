"""The guest's ChaCha20-Poly1305 through OpenSSL's EVP interface (``warden.channel.evp``) runs the
whole channel (the Noise test vectors run with it too: tests/unit/test_noise_vectors.py; its
bytes against ``cryptography``'s: tests/unit/test_aead_backends.py)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from warden.channel import evp, noise
from warden.channel.evp import EvpChaCha20Poly1305
from warden.channel.transport import Initiator, Responder

pytestmark = pytest.mark.skipif(not evp.load(), reason="no libcrypto to load")


def test_a_channel_with_evp_on_one_side_talks_to_cryptography_on_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    psk = os.urandom(32)
    host = Initiator(psk)  # cryptography
    monkeypatch.setattr(noise._Backend, "evp", True)
    guest = Responder(psk)
    guest_session = guest.receive(host.data_to_send())
    assert guest_session is not None
    reply = guest.data_to_send()
    assert isinstance(guest_session._send._aead, EvpChaCha20Poly1305)
    monkeypatch.setattr(noise._Backend, "evp", False)
    host_session = host.receive(reply)
    assert host_session is not None
    assert isinstance(host_session._send._aead, ChaCha20Poly1305)
    big = os.urandom(200_000)
    assert guest_session.feed(host_session.seal(big)) == big
    assert host_session.feed(guest_session.seal(b"back")) == b"back"


def test_window_pieces_are_checked_in_place_with_evp() -> None:
    """The guest checks a window piece where it lies (a writable buffer: the mmap the disk is
    read into), through EVP, and agrees with cryptography's tags."""
    from warden.channel.window import WindowAuth

    key = os.urandom(32)
    auth = WindowAuth(key)
    assert auth._evp is not None
    buffer = bytearray(os.urandom(1 << 20))
    piece = memoryview(buffer)[:700_000]
    tag = auth.tag(5, 9, bytes(piece))
    assert auth.check(5, 9, piece, tag)
    assert not auth.check(5, 10, piece, tag)
    assert not auth.check(6, 9, piece, tag)
    buffer[12] ^= 1
    assert not auth.check(5, 9, piece, tag)
    assert not auth.check(5, 9, piece, tag[:8])


@pytest.mark.parametrize("size", [1, 65519, 65520, 256 * 1024 + 5])
def test_sealing_in_place_gives_the_same_records(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's fast path (records encrypted straight into one buffer through EVP) gives
    the bytes of the general path, and a receiver opens them."""
    from warden.channel.noise import CipherState
    from warden.channel.transport import Session

    key = os.urandom(32)
    general = Session(CipherState(key), CipherState(key), b"h")
    receiver = Session(CipherState(key), CipherState(key), b"h")
    monkeypatch.setattr(noise._Backend, "evp", True)
    in_place = Session(CipherState(key), CipherState(key), b"h")
    assert in_place._send.evp is not None and general._send.evp is None
    data = os.urandom(size)
    for _ in range(2):  # and the nonces advance alike
        sealed = in_place.seal(data)
        assert sealed == general.seal(data)
        assert receiver.feed(sealed) == data
    assert in_place._send.n == general._send.n == 2 * -(-size // 65519)
