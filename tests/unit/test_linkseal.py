"""The end-to-end records of links (warden.channel.linkseal): both ciphers, rotation, attacks."""

from __future__ import annotations

import pytest

from warden.channel import evp, linkseal, sodium
from warden.channel.linkseal import LinkAuthError, Opener, Sealer, hkdf_sha256

KEY = bytes(range(32))


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, info, 42, salt)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.fixture(params=["sodium", "evp", "cryptography"])
def cipher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each backend in turn: those before it made unavailable."""
    order = ["sodium", "evp", "cryptography"]
    for module in (sodium, evp)[: order.index(request.param)]:
        monkeypatch.setattr(module, "available", lambda: False)
        monkeypatch.setattr(module, "load", lambda: False)
    if request.param == "sodium":
        assert sodium.load()  # make setup installs libsodium23
    elif request.param == "evp":
        assert evp.load()
    used = type(linkseal.Sealer(bytes(32), "a")._dir.aead)
    expected = {"sodium": "SodiumChaCha20Poly1305", "evp": "EvpChaCha20Poly1305"}
    assert used.__name__ == expected.get(request.param, "ChaCha20Poly1305")
    return str(request.param)


def test_a_stream_round_trips_each_way_and_ends(cipher: str) -> None:
    for sender, receiver in (("a", "b"), ("b", "a")):
        seal, open_ = Sealer(KEY, sender), Opener(KEY, receiver)
        assert open_.open(seal.seal(b"hello")) == b"hello"
        assert open_.open(seal.seal(b"x" * linkseal.MAX_PLAINTEXT)) == b"x" * linkseal.MAX_PLAINTEXT
        assert open_.open(seal.end()) is None
        with pytest.raises(LinkAuthError):
            open_.open(bytes(32))  # nothing follows the END
        with pytest.raises(ValueError):
            seal.seal(b"more")


def test_the_two_directions_do_not_share_keys(cipher: str) -> None:
    record = Sealer(KEY, "a").seal(b"reflected")
    with pytest.raises(LinkAuthError):
        Opener(KEY, "a").open(record)  # a's own record reflected back to it


def test_tampered_replayed_reordered_forged_and_cut_records_fail(cipher: str) -> None:
    seal = Sealer(KEY, "a")
    first, second = seal.seal(b"one"), seal.seal(b"two")
    bad = bytearray(first)
    bad[0] ^= 1
    with pytest.raises(LinkAuthError):
        Opener(KEY, "b").open(bytes(bad))
    with pytest.raises(LinkAuthError):
        Opener(KEY, "b").open(second)  # reordered: the counter is 0, not 1
    opener = Opener(KEY, "b")
    assert opener.open(first) == b"one"
    with pytest.raises(LinkAuthError):
        opener.open(first)  # replayed
    with pytest.raises(LinkAuthError):
        Opener(KEY, "b").open(bytes(16))  # a forged END: the stream cannot be cut short
    with pytest.raises(LinkAuthError):
        Opener(bytes(32), "b").open(first)  # another link's key


def test_keys_rotate_in_lockstep(cipher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkseal, "REKEY_RECORDS", 3)
    monkeypatch.setattr(linkseal, "REKEY_BYTES", 100)
    seal, opener = Sealer(KEY, "b"), Opener(KEY, "a")
    records = [seal.seal(bytes([i]) * (1 + 30 * (i % 2))) for i in range(10)]
    assert seal.rotations >= 3
    for i, record in enumerate(records):
        assert opener.open(record) == bytes([i]) * (1 + 30 * (i % 2))
    assert opener.rotations == seal.rotations
    # After a rotation the old key no longer opens anything: a record sealed at counter 0
    # under the first key is refused where counter 0 of a later key is expected.
    fresh = Opener(KEY, "a")
    for record in records[:3]:
        fresh.open(record)
    with pytest.raises(LinkAuthError):
        fresh.open(Sealer(KEY, "b").seal(bytes([3]) * 31))
