"""The audit log's bytes: canonical records, their MACs, checkpoint signatures, the head file
and the keys. Shared by the writer (``log.py``), the verifier and the readers.

::

    $WARDEN_HOME/audit/            0700
    $WARDEN_HOME/audit/audit.log   0600  one canonical JSON record a line
    $WARDEN_HOME/audit/head        0600  two 512-byte slots: the last (seq, mac, tail span), signed
    $WARDEN_HOME/audit/torn-*.bin  0600  a torn tail cut off after a crash, kept for forensics
    $WARDEN_HOME/keys/audit.key        0600  32 random bytes: the HMAC-SHA256 chain key
    $WARDEN_HOME/keys/audit-sign.key   0600  32 random bytes: the Ed25519 seed (RFC 8032 5.1.5)
    $WARDEN_HOME/keys/audit-sign.pub   0644  its public key (PEM), for a verifier without keys

A record is a JSON object; its line is its canonical encoding (sorted keys, no spaces,
``ensure_ascii``, no NaN) and a newline. ``mac = HMAC-SHA256(key, MAC_DOMAIN + canonical(record
without mac))``; the record carries ``prev``, the MAC of the record before it (64 zeros for the
first), so every MAC covers the whole chain before it (Schneier & Kelsey 1999).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from warden._errors import AuditLogError, AuditRecordError
from warden.config import Paths
from warden.seal.keys import KeyStore

MAX_RECORD_BYTES = 16 * 1024
"""The longest line a record may take, newline included; a bigger one is refused."""

GENESIS_PREV = "0" * 64
MAC_DOMAIN = b"warden-audit-record-v1\n"
CHECKPOINT_DOMAIN = b"warden-audit-checkpoint-v1\n"
HEAD_DOMAIN = b"warden-audit-head-v1\n"
KEY_ID_DOMAIN = b"warden-audit-mac-key-id-v1"

MAC_KEY_NAME = "audit"
SIGN_KEY_NAME = "audit-sign"
PUBLIC_KEY_FILE = "audit-sign.pub"

HEAD_SLOT_BYTES = 512
OLD_HEAD_SLOT_BYTES = 256
"""The slots of a head written before it held the tail's digest (read, never written)."""
OUTCOMES = frozenset({"ok", "denied", "error"})
RESERVED = frozenset({"seq", "time", "action", "principal", "sandbox", "outcome", "prev", "mac"})
FIELD_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ACTION_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
CHECKPOINT = "checkpoint"
"""The action of a signed checkpoint record (written by the log itself)."""

Field = str | int | float | bool | None


def log_dir(home: Path) -> Path:
    return home / "audit"


def log_path(home: Path) -> Path:
    return log_dir(home) / "audit.log"


def head_path(home: Path) -> Path:
    return log_dir(home) / "head"


def public_key_path(home: Path) -> Path:
    return home / "keys" / PUBLIC_KEY_FILE


def canonical(obj: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces, ASCII only, no NaN or infinity: one byte string per record."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def argv_digest(argv: list[str] | tuple[str, ...]) -> str:
    """The ``argv_sha256`` of an exec record: SHA-256 of the argv as canonical JSON (a list of
    strings), so ``["a b"]`` and ``["a", "b"]`` differ. Record this, never the argv itself."""
    return hashlib.sha256(canonical({"argv": list(argv)})).hexdigest()


def record_mac(key: bytes, record: dict[str, Any]) -> str:
    """The MAC of ``record`` (its own ``mac`` field, if any, left out)."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, MAC_DOMAIN + canonical(body), hashlib.sha256).hexdigest()


def mac_key_id(key: bytes) -> str:
    """A name for the HMAC key that does not reveal it: lets verify say "wrong key"."""
    return hmac.new(key, KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_fields(action: str, principal: str, outcome: str, fields: dict[str, Any]) -> None:
    """Refuse what a record must not hold; AuditRecordError says which field and why."""
    if not ACTION_RE.match(action):
        raise AuditRecordError(f"audit action {action!r} is not [a-z][a-z0-9_.-]{{0,63}}")
    if not principal:
        raise AuditRecordError("an audit record needs a principal (who asked)")
    if outcome not in OUTCOMES:
        raise AuditRecordError(f"audit outcome {outcome!r} is not one of {sorted(OUTCOMES)}")
    for name, value in fields.items():
        if name in RESERVED or not FIELD_RE.match(name):
            raise AuditRecordError(
                f"audit field {name!r} is reserved or not [a-z][a-z0-9_]{{0,63}}: rename it"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise AuditRecordError(
                f"audit field {name!r} is a {type(value).__name__}: only str, int, float, "
                "bool or None (put a digest, never raw contents)"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise AuditRecordError(f"audit field {name!r} is {value}: not a finite number")


def encode_line(record: dict[str, Any]) -> bytes:
    """The record's line, or AuditRecordError if it passes :data:`MAX_RECORD_BYTES`."""
    line = canonical(record) + b"\n"
    if len(line) > MAX_RECORD_BYTES:
        raise AuditRecordError(
            f"an audit record of {len(line)} bytes passes the {MAX_RECORD_BYTES}-byte bound: "
            "record a digest (sha256) of large values, never the values themselves"
        )
    return line


# -- checkpoints --------------------------------------------------------------------------


def checkpoint_message(record: dict[str, Any]) -> bytes:
    """What a checkpoint's Ed25519 signature covers: everything in it but ``sig`` and ``mac``."""
    body = {k: v for k, v in record.items() if k not in ("sig", "mac")}
    return CHECKPOINT_DOMAIN + canonical(body)


def check_signature(public: Ed25519PublicKey, sig_hex: object, message: bytes) -> bool:
    if not isinstance(sig_hex, str):
        return False
    try:
        public.verify(bytes.fromhex(sig_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the head file: two slots, each the last (seq, mac) signed ----------------------------


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str
    span: str | None = None
    """SHA-256 of the lines after the last checkpoint, through record ``seq``: so that a
    verifier with only the public key checks those too (None in a head of an older writer)."""


def _head_body(seq: int, mac: str, span: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"mac": mac, "seq": seq}
    if span is not None:
        body["span"] = span
    return body


def head_slot(signer: Ed25519PrivateKey, head: Head) -> bytes:
    body = _head_body(head.seq, head.mac, head.span)
    sig = signer.sign(HEAD_DOMAIN + canonical(body)).hex()
    data = canonical({**body, "sig": sig})
    return data.ljust(HEAD_SLOT_BYTES - 1, b" ") + b"\n"


def read_head(path: Path, public: Ed25519PublicKey) -> Head | None:
    """The newest slot of the head file whose signature holds, or None (missing or none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    best: Head | None = None
    for size in (HEAD_SLOT_BYTES, OLD_HEAD_SLOT_BYTES):  # a head of an older writer: 256
        for start in range(0, len(data), size):
            head = _parse_slot(data[start : start + size], public)
            if head is not None and (best is None or head.seq > best.seq):
                best = head
        if best is not None:
            return best
    return best


def _parse_slot(raw: bytes, public: Ed25519PublicKey) -> Head | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    seq, mac = obj.get("seq"), obj.get("mac")
    span = obj.get("span")
    if not isinstance(seq, int) or not isinstance(mac, str) or not isinstance(span, str | None):
        return None
    body = canonical(_head_body(seq, mac, span))
    if not check_signature(public, obj.get("sig"), HEAD_DOMAIN + body):
        return None
    return Head(seq, mac, span)


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    mac_key: bytes
    signer: Ed25519PrivateKey
    public: Ed25519PublicKey

    @property
    def mac_key_id(self) -> str:
        return mac_key_id(self.mac_key)

    @property
    def key_id(self) -> str:
        return public_key_id(self.public)


def load_keys(home: Path, *, create: bool) -> Keys:
    """The audit keys (made if ``create`` and absent), and the public key file written."""
    store = KeyStore(Paths(home))
    if create:
        mac_key, seed = store.ensure(MAC_KEY_NAME), store.ensure(SIGN_KEY_NAME)
    else:
        got_mac, got_seed = store.get(MAC_KEY_NAME), store.get(SIGN_KEY_NAME)
        if got_mac is None or got_seed is None:
            raise AuditLogError(
                f"the audit log under {log_dir(home)} exists but its key "
                f"{store.path(MAC_KEY_NAME if got_mac is None else SIGN_KEY_NAME)} is gone: "
                "the log can no longer be extended. Run `warden audit verify --public-only`, "
                "then move the audit/ dir aside to start a new log"
            )
        mac_key, seed = got_mac, got_seed
    signer = Ed25519PrivateKey.from_private_bytes(seed)
    keys = Keys(mac_key, signer, signer.public_key())
    _write_public(public_key_path(home), keys.public)
    return keys


def load_public(home: Path, path: Path | None = None) -> Ed25519PublicKey:
    """The checkpoint public key from ``path`` (default ``keys/audit-sign.pub``)."""
    path = path or public_key_path(home)
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuditLogError(f"cannot read the audit public key {path}: {exc}") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise AuditLogError(f"{path} is not an Ed25519 public key")
    return loaded


def load_own_public(home: Path) -> Ed25519PublicKey | None:
    """The public key derived from the private seed, when this process may read it: a
    replaced ``audit-sign.pub`` then cannot vouch for checkpoints re-signed by someone else."""
    seed = KeyStore(Paths(home)).get(SIGN_KEY_NAME)
    return None if seed is None else Ed25519PrivateKey.from_private_bytes(seed).public_key()


def load_mac_key(home: Path) -> bytes | None:
    """The HMAC key, or None if absent (a verifier that holds only the public key)."""
    return KeyStore(Paths(home)).get(MAC_KEY_NAME)


def _write_public(path: Path, public: Ed25519PublicKey) -> None:
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        if path.read_bytes() == pem:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # public: readable by a verifier that holds nothing else
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
