"""Finding a session in a stream with stale bytes (Responder, Initiator), the abort notice, and
the transfer window's tags (``warden.channel.window``). No VM: pure code."""

from __future__ import annotations

import os

import pytest

from warden.channel.errors import ChannelError
from warden.channel.transport import (
    HANDSHAKE_SIZE,
    MAGIC,
    MAX_RECORD,
    RECORD_HEADER_SIZE,
    Initiator,
    Responder,
    abort_notice,
    describe_abort,
)
from warden.channel.window import WindowAuth, window_nonce

PSK = bytes(range(32))


def test_a_responder_skips_stale_bytes_and_a_partial_magic_before_the_handshake() -> None:
    host = Initiator(PSK)
    guest = Responder(PSK)
    stale = os.urandom(5000) + MAGIC[:3] + b"x" + bytes(RECORD_HEADER_SIZE + MAX_RECORD)
    message = host.data_to_send()
    assert guest.receive(stale) is None
    assert guest.receive(message[:10]) is None  # a message may arrive in pieces
    session = guest.receive(message[10:] + b"after")
    assert session is not None
    assert guest.rest == b"after"
    assert guest.failures == []
    host_session = host.receive(os.urandom(100) + guest.data_to_send())
    assert host_session is not None
    assert session.feed(host_session.seal(b"hello")) == b"hello"


def test_a_responder_refuses_a_foreign_handshake_and_then_accepts_the_real_one() -> None:
    stranger, host = Initiator(os.urandom(32)), Initiator(PSK)
    seen: list[bytes] = []
    guest = Responder(PSK, on_message=seen.append)
    assert guest.receive(stranger.data_to_send() + host.data_to_send()) is not None
    assert len(guest.failures) == 1 and "different secrets" in guest.failures[0]
    assert len(seen) == 2 and all(len(m) == HANDSHAKE_SIZE for m in seen)
    replies = guest.data_to_send()  # a refusal for the stranger, then the answer
    with pytest.raises(ChannelError, match="different secrets"):
        stranger.receive(replies)
    assert host.receive(replies[HANDSHAKE_SIZE - 48 :]) is not None  # after the 6-byte refusal


def test_a_responder_buffers_no_more_than_one_message_of_garbage() -> None:
    guest = Responder(PSK)
    for _ in range(50):
        assert guest.receive(os.urandom(65536).replace(MAGIC, b"")) is None
    assert len(guest._buf) < len(MAGIC)


def test_an_initiator_skips_the_abort_notice_of_an_earlier_session() -> None:
    host, guest = Initiator(PSK), Responder(PSK)
    assert guest.receive(host.data_to_send()) is not None
    assert host.receive(abort_notice() + guest.data_to_send()) is not None


def test_a_failed_record_keeps_its_bytes_for_the_next_hunt() -> None:
    host, guest = Initiator(PSK), Responder(PSK)
    guest_session = guest.receive(host.data_to_send())
    assert guest_session is not None
    new_host = Initiator(PSK)
    hello = new_host.data_to_send()
    with pytest.raises(ChannelError):
        guest_session.feed(hello)  # "WDNC" read as a record length: refused
    assert guest_session.unread == hello
    assert Responder(PSK).receive(guest_session.unread) is not None


def test_the_abort_notice_is_recognised_and_nothing_else_is() -> None:
    assert describe_abort(abort_notice() + b"rest") is not None
    assert describe_abort(os.urandom(64)) is None
    assert describe_abort(b"") is None


def test_window_tags_bind_the_piece_to_its_request_and_place() -> None:
    key = os.urandom(32)
    auth, other = WindowAuth(key), WindowAuth(os.urandom(32))
    piece = os.urandom(1 << 20)
    tag = auth.tag(7, 3, piece)
    assert len(tag) == 16
    assert auth.check(7, 3, piece, tag)
    altered = bytearray(piece)
    altered[12345] ^= 1
    assert not auth.check(7, 3, bytes(altered), tag)  # altered
    assert not auth.check(8, 3, piece, tag)  # another request
    assert not auth.check(7, 4, piece, tag)  # another place: replayed or reordered
    assert not other.check(7, 3, piece, tag)  # another session's key
    assert window_nonce(7, 3) != window_nonce(3, 7)
    with pytest.raises(ValueError, match="32 bytes"):
        WindowAuth(b"short")


def test_an_initiator_skips_the_answer_to_an_earlier_hosts_handshake() -> None:
    """The guest read an earlier host's handshake late and answered it into our stream: that
    answer does not authenticate with our state, so the hunt goes on to ours."""
    earlier, ours = Initiator(PSK), Initiator(PSK)
    guest = Responder(PSK)
    assert guest.receive(earlier.data_to_send()) is not None
    stale_answer = guest.data_to_send()
    guest = Responder(PSK)
    assert guest.receive(ours.data_to_send()) is not None
    session = ours.receive(abort_notice() + stale_answer + abort_notice() + guest.data_to_send())
    assert session is not None


def test_an_initiator_fails_on_a_refusal_with_no_answer_after_it() -> None:
    host = Initiator(PSK)
    guest = Responder(os.urandom(32))
    assert guest.receive(host.data_to_send()) is None
    with pytest.raises(ChannelError, match="different secrets"):
        host.receive(guest.data_to_send())


def test_an_initiator_notes_the_answers_it_skipped() -> None:
    """An altered answer is skipped like a stale one, and noted: the host gives up on it after
    a grace period (agent/secure.py) with a clear error instead of a timeout."""
    host, guest = Initiator(PSK), Responder(PSK)
    assert guest.receive(host.data_to_send()) is not None
    answer = bytearray(guest.data_to_send())
    answer[10] ^= 0x01
    assert host.receive(bytes(answer)) is None
    assert len(host.skipped) == 1 and "authentication" in host.skipped[0]
