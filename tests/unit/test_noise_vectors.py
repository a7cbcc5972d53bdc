"""warden.channel.noise against published Noise test vectors.

The vectors are in noise_vectors.json beside this file: the entries for the patterns that
warden.channel.noise runs (NNpsk0, and NN and NNpsk2 because they cost nothing more), copied from

- haskell-cryptography/cacophony, ``vectors/cacophony.txt`` (Unlicense, public domain);
- mcginty/snow, ``tests/vectors/snow.txt`` (Apache-2.0 OR MIT).

Each vector fixes both sides' prologue, psk and ephemeral private key, and lists the messages
in order: the handshake messages first (the initiator writes the even ones), then transport
messages, which alternate the same way (even: initiator to responder, with the first
CipherState of Split(); odd: the other way, with the second).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from warden.channel.errors import ChannelError
from warden.channel.noise import PATTERNS, CipherState, HandshakeState, hkdf, protocol_name

VECTORS_FILE = Path(__file__).with_name("noise_vectors.json")
SUITE = "_25519_ChaChaPoly_SHA256"


def load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]
    return vectors


VECTORS = load_vectors()


def pattern_of(vector: dict[str, Any]) -> str:
    name: str = vector["protocol_name"]
    assert name.startswith("Noise_") and name.endswith(SUITE), name
    return name.removeprefix("Noise_").removesuffix(SUITE)


def side(vector: dict[str, Any], role: str) -> HandshakeState:
    psks = vector.get(f"{role}_psks") or []
    assert len(psks) <= 1, "multi-psk patterns are not run"
    return HandshakeState(
        initiator=role == "init",
        psk=bytes.fromhex(psks[0]) if psks else None,
        prologue=bytes.fromhex(vector[f"{role}_prologue"]),
        pattern=pattern_of(vector),
        ephemeral=bytes.fromhex(vector[f"{role}_ephemeral"]),
    )


def vector_id(vector: dict[str, Any]) -> str:
    return f"{vector['source']}:{vector['protocol_name']}"


def test_the_vectors_cover_the_channel_pattern_from_two_sources() -> None:
    names = {(v["source"], v["protocol_name"]) for v in VECTORS}
    assert ("cacophony", "Noise_NNpsk0_25519_ChaChaPoly_SHA256") in names
    assert {pattern_of(v) for v in VECTORS} == set(PATTERNS)
    assert {v["source"] for v in VECTORS} == {"cacophony", "snow"}


@pytest.fixture(params=["cryptography", "evp", "sodium"])
def aead_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each vector runs with the host's primitives (cryptography, hashlib), the guest's
    records (OpenSSL's EVP through ctypes, warden.channel.evp) and the guest's handshake
    (libsodium through ctypes, warden.channel.sodium: X25519, SHA-256, HMAC and the
    handshake's ChaCha20-Poly1305), each against the same published bytes."""
    from warden.channel import evp, noise, sodium

    if request.param in ("evp", "sodium"):
        if not evp.load():
            pytest.skip("no libcrypto to load")
        monkeypatch.setattr(noise._Backend, "evp", True)
    if request.param == "sodium":
        assert sodium.load(), "libsodium23 is installed by make setup"
        monkeypatch.setattr(noise._Backend, "sodium", sodium)
    return str(request.param)


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector(vector: dict[str, Any], aead_backend: str) -> None:
    initiator, responder = side(vector, "init"), side(vector, "resp")
    messages = vector["messages"]
    handshake_length = len(PATTERNS[pattern_of(vector)])
    for i, message in enumerate(messages[:handshake_length]):
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        payload, ciphertext = bytes.fromhex(message["payload"]), message["ciphertext"]
        assert writer.write_message(payload).hex() == ciphertext, f"handshake message {i}"
        assert reader.read_message(bytes.fromhex(ciphertext)) == payload
    assert initiator.finished and responder.finished
    if "handshake_hash" in vector:
        assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash == initiator.handshake_hash
    init_send, init_recv = initiator.split()
    resp_recv, resp_send = responder.split()
    for i, message in enumerate(messages[handshake_length:], start=handshake_length):
        sender, receiver = (init_send, resp_recv) if i % 2 == 0 else (resp_send, init_recv)
        payload, ciphertext = bytes.fromhex(message["payload"]), message["ciphertext"]
        assert sender.encrypt_with_ad(b"", payload).hex() == ciphertext, f"transport message {i}"
        assert receiver.decrypt_with_ad(b"", bytes.fromhex(ciphertext)) == payload
    assert len(messages) > handshake_length, "the vector has transport messages"


def channel_vector() -> dict[str, Any]:
    return next(
        v
        for v in VECTORS
        if v["source"] == "cacophony" and v["protocol_name"].startswith("Noise_NNpsk0_")
    )


def test_a_flipped_bit_in_each_handshake_message_of_the_vector_is_refused() -> None:
    vector = channel_vector()
    for i in (0, 1):
        initiator, responder = side(vector, "init"), side(vector, "resp")
        first = bytearray(initiator.write_message(bytes.fromhex(vector["messages"][0]["payload"])))
        if i == 0:
            first[-1] ^= 1
            with pytest.raises(ChannelError, match="failed authentication"):
                responder.read_message(bytes(first))
            continue
        responder.read_message(bytes(first))
        second = bytearray(responder.write_message(b""))
        second[5] ^= 0x80  # inside the responder's ephemeral key
        with pytest.raises(ChannelError):
            initiator.read_message(bytes(second))


def test_the_vector_with_another_psk_or_prologue_fails() -> None:
    vector = channel_vector()
    first = side(vector, "init").write_message(b"")
    for change in ("resp_psks", "resp_prologue"):
        altered = dict(vector)
        altered[change] = ["00" * 32] if change == "resp_psks" else "00"
        with pytest.raises(ChannelError, match="failed authentication"):
            side(altered, "resp").read_message(first)


def test_a_handshake_message_over_65535_bytes_is_refused() -> None:
    initiator = HandshakeState(initiator=True, psk=bytes(32))
    with pytest.raises(ValueError, match="exceeds 65535"):
        initiator.write_message(bytes(65535 - 32 - 16 + 1))
    responder = HandshakeState(initiator=False, psk=bytes(32))
    with pytest.raises(ChannelError, match="too long"):
        responder.read_message(bytes(65536))
    with pytest.raises(ChannelError, match="already failed"):
        responder.read_message(bytes(48))


def test_hkdf_is_rfc5869_with_the_chaining_key_as_salt() -> None:
    # RFC 5869 test case 3: SHA-256, IKM 22 bytes of 0x0b, no salt (= HashLen zero bytes), no
    # info, L = 42. Noise's HKDF outputs are T(1), T(2), T(3) of RFC 5869's expand step.
    okm = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    output1, output2 = hkdf(bytes(32), bytes.fromhex("0b" * 22), 2)
    assert (output1 + output2)[:42] == okm


def test_hkdf_matches_cryptography_for_three_outputs() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    chaining_key, ikm = bytes(range(32)), bytes(range(100, 132))
    expected = HKDF(hashes.SHA256(), 96, chaining_key, b"").derive(ikm)
    assert b"".join(hkdf(chaining_key, ikm, 3)) == expected


def test_the_protocol_name_is_hashed_when_longer_than_hashlen() -> None:
    assert len(protocol_name("NNpsk0")) > 32  # so h starts as SHA256(name) (section 5.2)


def test_cipher_state_rekey_changes_the_key_but_not_the_nonce() -> None:
    a, b = CipherState(bytes(32)), CipherState(bytes(32))
    a.encrypt_with_ad(b"", b"x")
    b.decrypt_with_ad(b"", CipherState(bytes(32)).encrypt_with_ad(b"", b"x"))
    a.rekey()
    message = a.encrypt_with_ad(b"", b"after")
    assert a.n == 2
    with pytest.raises(ChannelError):
        b.decrypt_with_ad(b"", message)
    b.rekey()
    assert b.decrypt_with_ad(b"", message) == b"after"


def test_the_last_nonce_is_reserved() -> None:
    c = CipherState(bytes(32))
    c.set_nonce((1 << 64) - 2)
    c.encrypt_with_ad(b"", b"last")
    with pytest.raises(ChannelError, match="exhausted"):
        c.encrypt_with_ad(b"", b"one too many")


# -- a cross-check with a second implementation: the noiseprotocol package (tests only) ---------


def other_side(pattern: str, *, initiator: bool, psk: bytes, prologue: bytes) -> Any:
    """The same side in noiseprotocol, an independent implementation."""
    from noise.connection import NoiseConnection  # type: ignore[import-untyped]

    connection = NoiseConnection.from_name(protocol_name(pattern))
    connection.set_psks(psk=psk)
    connection.set_prologue(prologue)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.start_handshake()
    return connection


@pytest.mark.parametrize("ours_initiate", [True, False], ids=["ours-initiate", "theirs-initiate"])
def test_random_sessions_interoperate_with_noiseprotocol(ours_initiate: bool) -> None:
    rng = random.Random(7)  # noqa: S311 (reproducible test inputs)
    for _ in range(20):
        psk, prologue = rng.randbytes(32), rng.randbytes(rng.randrange(40))
        ours = HandshakeState(initiator=ours_initiate, psk=psk, prologue=prologue)
        theirs = other_side("NNpsk0", initiator=not ours_initiate, psk=psk, prologue=prologue)
        for i in range(2):
            payload = rng.randbytes(rng.randrange(100))
            if (i % 2 == 0) == ours_initiate:
                assert theirs.read_message(ours.write_message(payload)) == payload
            else:
                assert ours.read_message(theirs.write_message(payload)) == payload
        assert ours.finished and theirs.handshake_finished
        assert ours.handshake_hash == theirs.get_handshake_hash()
        first, second = ours.split()
        send, receive = (first, second) if ours_initiate else (second, first)
        for rekey in (False, True):
            if rekey:  # Rekey() of sections 4.2 and 11.3, on both directions
                send.rekey()
                receive.rekey()
                theirs.rekey_inbound_cipher()
                theirs.rekey_outbound_cipher()
            data = rng.randbytes(rng.randrange(2000))
            assert theirs.decrypt(send.encrypt_with_ad(b"", data)) == data
            assert receive.decrypt_with_ad(b"", theirs.encrypt(data)) == data


def test_noiseprotocol_refuses_what_our_side_makes_with_another_psk() -> None:
    ours = HandshakeState(initiator=True, psk=bytes(32), prologue=b"")
    theirs = other_side("NNpsk0", initiator=False, psk=bytes(range(32)), prologue=b"")
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):  # noiseprotocol lets cryptography's error through
        theirs.read_message(ours.write_message(b"payload"))
