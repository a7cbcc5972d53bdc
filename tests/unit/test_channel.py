"""The agent channel's handshake and records (warden.channel.transport), with no VM.

A man in the middle is played by editing the bytes between the two sides: every tampered,
replayed, reordered, truncated, oversized or foreign record is refused with ChannelError, and
the session is dead afterwards.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.channel import transport
from warden.channel.errors import ChannelError
from warden.channel.noise import TAG_SIZE
from warden.channel.transport import (
    CHANNEL_VERSION,
    HANDSHAKE_SIZE,
    MAGIC,
    MAX_RECORD,
    MAX_RECORD_PLAINTEXT,
    Handshake,
    Session,
)
from warden.wire.frame import Frame, FrameType, encode

PSK = bytes(range(32))
OTHER_PSK = bytes(range(1, 33))
LENGTH = struct.Struct(">I")


def connect(
    psk: bytes = PSK, responder_psk: bytes | None = None
) -> tuple[Handshake, Handshake, Session, Session]:
    """A full handshake in memory: (initiator, responder, their two sessions)."""
    initiator = Handshake(psk, initiator=True)
    responder = Handshake(psk if responder_psk is None else responder_psk, initiator=False)
    assert responder.receive(initiator.data_to_send()) == b""
    assert initiator.receive(responder.data_to_send()) == b""
    return initiator, responder, initiator.session(), responder.session()


def sessions() -> tuple[Session, Session]:
    _, _, host, guest = connect()
    return host, guest


def assert_refused(session: Session, data: bytes, match: str | None = None) -> None:
    """``data`` (then the end of the stream) is refused, and the session is dead after it."""
    with pytest.raises(ChannelError, match=match):
        session.feed(data)
        session.eof()
    assert_dead(session)


def assert_dead(session: Session) -> None:
    assert not session.alive
    with pytest.raises(ChannelError, match="dead after an earlier error"):
        session.feed(b"")
    with pytest.raises(ChannelError, match="dead after an earlier error"):
        session.seal(b"more")
    with pytest.raises(ChannelError, match="dead after an earlier error"):
        session.eof()


def records(sealed: bytes) -> list[bytes]:
    """Split sealed bytes into their records (header included)."""
    out = []
    while sealed:
        (length,) = LENGTH.unpack_from(sealed)
        out.append(sealed[: LENGTH.size + length])
        sealed = sealed[LENGTH.size + length :]
    return out


# -- the handshake ------------------------------------------------------------------------------


def test_a_handshake_sets_up_one_session_on_both_sides() -> None:
    initiator = Handshake(PSK, initiator=True)
    responder = Handshake(PSK, initiator=False)
    first = initiator.data_to_send()
    assert len(first) == HANDSHAKE_SIZE == 54 and first.startswith(MAGIC)
    assert initiator.data_to_send() == b"", "sent once"
    assert responder.data_to_send() == b"", "the responder speaks second"
    assert not responder.complete
    responder.receive(first)
    second = responder.data_to_send()
    assert len(second) == HANDSHAKE_SIZE and responder.complete
    assert not initiator.complete
    initiator.receive(second)
    host, guest = initiator.session(), responder.session()
    assert host.handshake_hash == guest.handshake_hash and len(host.handshake_hash) == 32
    assert guest.feed(host.seal(b"hello guest")) == b"hello guest"
    assert host.feed(guest.seal(b"hello host")) == b"hello host"


def test_handshake_bytes_may_arrive_one_at_a_time_with_records_behind_them() -> None:
    initiator = Handshake(PSK, initiator=True)
    responder = Handshake(PSK, initiator=False)
    first = initiator.data_to_send()
    for i in range(len(first)):
        assert responder.receive(first[i : i + 1]) == b""
    guest = responder.session()
    second = responder.data_to_send() + guest.seal(b"first record")
    rest = b""
    for i in range(len(second)):
        piece = second[i : i + 1]
        rest += piece if initiator.complete else initiator.receive(piece)
    assert initiator.session().feed(rest) == b"first record"
    with pytest.raises(RuntimeError, match="feed the session"):
        initiator.receive(b"x")


def test_a_wrong_psk_fails_the_handshake_on_both_sides_with_a_clear_error() -> None:
    initiator = Handshake(PSK, initiator=True)
    responder = Handshake(OTHER_PSK, initiator=False)
    with pytest.raises(ChannelError, match="different secrets for this VM"):
        responder.receive(initiator.data_to_send())
    refusal = responder.data_to_send()
    assert refusal == MAGIC + bytes([CHANNEL_VERSION, transport.STATUS_REFUSED_AUTH])
    with pytest.raises(ChannelError, match="refused the handshake: the two sides hold different"):
        initiator.receive(refusal)
    for side in (initiator, responder):
        assert not side.complete
        with pytest.raises(ChannelError, match="already failed"):
            side.receive(b"")
        with pytest.raises(RuntimeError):
            side.session()


def test_an_altered_or_foreign_responder_message_fails_the_initiator() -> None:
    initiator = Handshake(PSK, initiator=True)
    responder = Handshake(PSK, initiator=False)
    responder.receive(initiator.data_to_send())
    second = bytearray(responder.data_to_send())
    second[-1] ^= 1
    with pytest.raises(ChannelError, match="handshake failed"):
        initiator.receive(bytes(second))
    # the answer of a responder to another initiator's message (same psk)
    initiator = Handshake(PSK, initiator=True)
    other = Handshake(PSK, initiator=False)
    other.receive(Handshake(PSK, initiator=True).data_to_send())
    assert other.complete
    with pytest.raises(ChannelError, match="handshake failed"):
        initiator.receive(other.data_to_send())


def test_every_flipped_bit_of_the_first_handshake_message_is_refused() -> None:
    first = Handshake(PSK, initiator=True).data_to_send()
    for bit in range(len(first) * 8):
        altered = bytearray(first)
        altered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ChannelError):
            Handshake(PSK, initiator=False).receive(bytes(altered))


def test_a_peer_of_another_channel_version_is_refused_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    initiator = Handshake(PSK, initiator=True)
    first = initiator.data_to_send()
    # a guest agent of a later version refuses this host's version, and says its own
    monkeypatch.setattr(transport, "CHANNEL_VERSION", CHANNEL_VERSION + 1)
    monkeypatch.setattr(transport, "PROLOGUE", MAGIC + bytes([CHANNEL_VERSION + 1]))
    future = Handshake(PSK, initiator=False)
    with pytest.raises(ChannelError, match=f"speaks channel version {CHANNEL_VERSION}, this "):
        future.receive(first)
    refusal = future.data_to_send()
    monkeypatch.undo()
    assert refusal == MAGIC + bytes([CHANNEL_VERSION + 1, transport.STATUS_REFUSED_VERSION])
    with pytest.raises(
        ChannelError, match=f"speaks channel version {CHANNEL_VERSION + 1}, this side version 1"
    ):
        initiator.receive(refusal)
    # and a host of a later version gets the same from this agent
    later = MAGIC + bytes([CHANNEL_VERSION + 1]) + first[len(MAGIC) + 1 :]
    agent = Handshake(PSK, initiator=False)
    with pytest.raises(ChannelError, match="rebuild the guest image"):
        agent.receive(later)
    assert agent.data_to_send()[len(MAGIC)] == CHANNEL_VERSION


def test_the_version_is_bound_into_the_handshake_as_its_prologue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = Handshake(PSK, initiator=True).data_to_send()
    # same header, but a responder whose prologue differs: the handshake does not authenticate
    monkeypatch.setattr(transport, "PROLOGUE", MAGIC + bytes([CHANNEL_VERSION + 1]))
    with pytest.raises(ChannelError, match="different secrets"):
        Handshake(PSK, initiator=False).receive(first)


def test_a_peer_that_does_not_speak_the_channel_is_refused() -> None:
    hello = encode(Frame(FrameType.HELLO, 0, payload=b'{"nonce":"x"}'))
    for side in (Handshake(PSK, initiator=True), Handshake(PSK, initiator=False)):
        side.data_to_send()
        with pytest.raises(ChannelError, match="did not begin a warden channel handshake"):
            side.receive(hello)
        assert side.data_to_send() == b"", "no answer to a stranger"


def test_an_initiator_message_with_a_refusal_status_is_refused() -> None:
    first = bytearray(Handshake(PSK, initiator=True).data_to_send())
    first[len(MAGIC) + 1] = transport.STATUS_REFUSED_AUTH
    with pytest.raises(ChannelError, match="invalid status 2"):
        Handshake(PSK, initiator=False).receive(bytes(first))


def test_a_psk_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Handshake(PSK[:16], initiator=True)


def test_two_sessions_with_one_psk_have_different_keys() -> None:
    host_a, guest_a = sessions()
    host_b, guest_b = sessions()
    assert host_a.handshake_hash != host_b.handshake_hash
    to_a, to_b = host_a.seal(b"same plaintext"), host_b.seal(b"same plaintext")
    assert to_a != to_b
    assert_refused(guest_b, to_a, match="record 0 failed authentication")
    assert_refused(guest_a, to_b, match="another session")
    # and the other direction, with fresh sessions
    host_a, guest_a = sessions()
    host_b, guest_b = sessions()
    assert_refused(host_a, guest_b.seal(b"from b"), match="failed authentication")
    assert_refused(host_b, guest_a.seal(b"from a"), match="failed authentication")


# -- records ------------------------------------------------------------------------------------


def test_records_carry_a_byte_stream_in_pieces_of_any_size() -> None:
    host, guest = sessions()
    data = os.urandom(3 * MAX_RECORD_PLAINTEXT + 1000)
    sealed = host.seal(data)
    sizes = [len(r) for r in records(sealed)]
    assert sizes == [4 + MAX_RECORD] * 3 + [4 + 1000 + TAG_SIZE]
    got = bytearray()
    for start in range(0, len(sealed), 7777):
        got += guest.feed(sealed[start : start + 7777])
    assert bytes(got) == data and guest.buffered == 0
    guest.eof()
    assert host.seal(b"") == b""
    assert guest.feed(host.seal(b"x") + host.seal(b"yz")) == b"xyz"


def test_an_empty_record_is_valid() -> None:
    host, guest = sessions()
    empty = LENGTH.pack(TAG_SIZE) + host._send.encrypt_with_ad(b"", b"")
    assert guest.feed(empty + host.seal(b"after")) == b"after"


@pytest.mark.parametrize("where", ["length", "ciphertext", "tag"])
def test_every_flipped_bit_is_refused_and_kills_the_session(where: str) -> None:
    probe = sessions()[0].seal(b"hello")
    span = {"length": (0, 4), "ciphertext": (4, 9), "tag": (9, len(probe))}[where]
    for bit in range(span[0] * 8, span[1] * 8):
        host, guest = sessions()
        record = bytearray(host.seal(b"hello"))
        record[bit // 8] ^= 1 << (bit % 8)
        assert_refused(guest, bytes(record) + host.seal(b"next"))


def test_a_replayed_record_is_refused() -> None:
    host, guest = sessions()
    first = host.seal(b"rm -rf /tmp/x")
    assert guest.feed(first) == b"rm -rf /tmp/x"
    assert_refused(guest, first, match="record 1 failed authentication: .*replayed")


def test_reordered_records_are_refused() -> None:
    host, guest = sessions()
    one, two = host.seal(b"one"), host.seal(b"two")
    assert_refused(guest, two + one, match="record 0 failed authentication")


def test_a_dropped_record_is_refused() -> None:
    host, guest = sessions()
    host.seal(b"dropped")
    assert_refused(guest, host.seal(b"kept"), match="record 0 failed")


def test_a_stream_that_ends_inside_a_record_is_refused() -> None:
    for cut in (2, 4, 4 + len(b"truncated") + TAG_SIZE - 1):
        host, guest = sessions()
        record = host.seal(b"truncated")
        assert guest.feed(record[:cut]) == b""
        with pytest.raises(ChannelError, match="ended inside a record"):
            guest.eof()
        assert_dead(guest)


def test_a_truncated_record_with_a_matching_length_is_refused() -> None:
    for keep in (TAG_SIZE, TAG_SIZE + 3):  # the tag cut off, or part of the ciphertext
        host, guest = sessions()
        ciphertext = host.seal(b"a longer message")[4:]
        assert_refused(guest, LENGTH.pack(keep) + ciphertext[:keep], match="failed auth")


@pytest.mark.parametrize("length", [MAX_RECORD + 1, 1 << 20, (1 << 32) - 1])
def test_an_oversized_record_is_refused_at_its_header(length: int) -> None:
    host, guest = sessions()
    assert guest.feed(host.seal(b"fine")) == b"fine"
    with pytest.raises(ChannelError, match=f"a record of {length} bytes exceeds the maximum"):
        guest.feed(LENGTH.pack(length))  # refused before any of the body is buffered
    assert guest.buffered == 0
    assert_dead(guest)


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE - 1])
def test_a_record_shorter_than_its_tag_is_refused(length: int) -> None:
    _, guest = sessions()
    assert_refused(guest, LENGTH.pack(length) + bytes(length), match="shorter than its 16-byte")


def test_a_record_injected_from_a_second_session_is_refused() -> None:
    host, guest = sessions()
    intruder, _ = sessions()  # same psk, its own handshake
    assert guest.feed(host.seal(b"one")) == b"one"
    assert_refused(guest, intruder.seal(b"injected"), match="another session")


def test_the_records_before_a_bad_one_are_not_returned_and_the_session_dies() -> None:
    host, guest = sessions()
    good = host.seal(b"good")
    bad = bytearray(host.seal(b"bad"))
    bad[-1] ^= 1
    with pytest.raises(ChannelError, match="record 1"):
        guest.feed(good + bytes(bad))
    assert_dead(guest)


def test_a_sender_whose_nonces_are_exhausted_dies() -> None:
    host, _ = sessions()
    host._send.set_nonce((1 << 64) - 1)
    with pytest.raises(ChannelError, match="exhausted"):
        host.seal(b"x")
    assert_dead(host)


def test_a_receiver_whose_nonces_are_exhausted_dies() -> None:
    host, guest = sessions()
    guest._receive.set_nonce((1 << 64) - 1)
    assert_refused(guest, host.seal(b"x"), match="exhausted")


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_never_crash_the_record_decoder(chunks: list[bytes]) -> None:
    _, guest = sessions()
    try:
        for chunk in chunks:
            assert guest.feed(chunk) == b"", "random bytes never authenticate"
        guest.eof()
    except ChannelError:
        assert not guest.alive


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_never_crash_the_handshake(data: bytes, initiator: bool) -> None:
    side = Handshake(PSK, initiator=initiator)
    side.data_to_send()
    try:
        side.receive(data)
    except ChannelError:
        return
    assert not side.complete


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(max_size=2 * MAX_RECORD_PLAINTEXT // 3), min_size=1, max_size=4),
    st.integers(1, 70000),
)
def test_any_chunking_of_the_stream_gives_back_the_plaintext(
    messages: list[bytes], step: int
) -> None:
    host, guest = sessions()
    sealed = b"".join(host.seal(m) for m in messages)
    got = b"".join(guest.feed(sealed[i : i + step]) for i in range(0, len(sealed), step))
    assert got == b"".join(messages)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_altered_byte_of_a_stream_is_refused(data: st.DataObject) -> None:
    host, guest = sessions()
    sealed = bytearray(host.seal(b"abc") + host.seal(bytes(100)) + host.seal(b"xyz"))
    at = data.draw(st.integers(0, len(sealed) - 1))
    sealed[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ChannelError):
        guest.feed(bytes(sealed))
        guest.eof()
