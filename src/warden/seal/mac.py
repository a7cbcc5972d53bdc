"""Seal a record with the host key: HMAC-SHA256 over its canonical JSON.

A sealed record is a JSON object of plain values (str, int, float, bool, lists, objects)
plus one ``"seal"`` entry: ``{"alg": "HMAC-SHA256", "version": 1, "key": "seal",
"tag": <hex>}``. The tag covers every other entry, under a purpose string that keeps one kind
of sealed record from passing for another (a template's record cannot be replayed as a
paused VM's)::

    tag = HMAC-SHA256(key, b"warden-seal/1\\0" + purpose + b"\\0" + canonical_json(record))

``canonical_json`` sorts keys, has no spaces and escapes every non-ASCII character, so it is
the same bytes when the record is parsed back (Python writes floats in their shortest form,
which parses back to the same float).

A large file is sealed through its SHA-256 in the record (hash, then MAC): forging a seal
needs the key or a second SHA-256 preimage. The digest can then be remembered between
processes (``digests.py``), so an unchanged file is not read again on every use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from warden.config import Paths
from warden.seal.keys import KeyStore

SEAL_FIELD = "seal"
SEAL_ALG = "HMAC-SHA256"
SEAL_VERSION = 1
SEAL_KEY_NAME = "seal"
"""The host key that seals what a QEMU loads: ``keys/seal.key``."""
_DOMAIN = b"warden-seal/1\0"


class SealRefused(Exception):
    """A sealed record did not verify; ``str()`` says why, for a log line."""


def canonical_json(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


class Sealer:
    """Seals and verifies records of one ``purpose`` with a host key from the key store."""

    def __init__(self, paths: Paths, purpose: str, key_name: str = SEAL_KEY_NAME) -> None:
        self.keys = KeyStore(paths)
        self.purpose = purpose
        self.key_name = key_name

    def _tag(self, key: bytes, record: Mapping[str, Any]) -> str:
        message = _DOMAIN + self.purpose.encode() + b"\0" + canonical_json(record)
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def seal(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """``record`` with its ``"seal"`` entry added (the key is made on first use)."""
        body = {k: v for k, v in record.items() if k != SEAL_FIELD}
        tag = self._tag(self.keys.ensure(self.key_name), body)
        seal = {"alg": SEAL_ALG, "version": SEAL_VERSION, "key": self.key_name, "tag": tag}
        return {**body, SEAL_FIELD: seal}

    def verify(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record without its seal, if the seal verifies; SealRefused says why not."""
        seal = record.get(SEAL_FIELD)
        if not isinstance(seal, dict):
            raise SealRefused("it is not sealed (saved by an older warden, or not by warden)")
        if seal.get("alg") != SEAL_ALG or seal.get("version") != SEAL_VERSION:
            raise SealRefused(
                f"its seal is {seal.get('alg')!r} version {seal.get('version')!r}; this warden "
                f"reads {SEAL_ALG} version {SEAL_VERSION}"
            )
        tag = seal.get("tag")
        key = self.keys.get(self.key_name)
        body = {k: v for k, v in record.items() if k != SEAL_FIELD}
        try:
            expected = self._tag(key, body) if key is not None else None
        except ValueError:  # NaN or Infinity: never in a record that warden sealed
            expected = None
        if (
            expected is None
            or not isinstance(tag, str)
            or not hmac.compare_digest(tag.encode(), expected.encode())
        ):
            raise SealRefused(
                "its seal does not verify: it was sealed with another host key, or its "
                "metadata was altered"
            )
        return body
