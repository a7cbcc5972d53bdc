"""API tokens: each names a principal and its roles, and is stored hashed.

A token's text is ``wdn_<id>_<secret>``: a recognisable prefix (so that a secret scanner, or a
person, can tell a leaked one: GitHub's ``ghp_`` and Stripe's ``sk_live_`` design), the token's
public id (12 hex digits: ``warden token list`` and ``revoke`` name it), and 32 random bytes
(``secrets.token_bytes``, base64url). It is shown once, by ``warden token create``; the store
keeps only ``SHA-256(text)``. A slow password hash (bcrypt, argon2) exists to stretch
low-entropy secrets; a 256-bit random secret cannot be guessed, so one SHA-256 is enough and
costs microseconds per request (OWASP's Password Storage Cheat Sheet, and GitHub's "Behind
GitHub's new authentication token formats", 2021, reason the same way). Digests are compared
with :func:`hmac.compare_digest`.

The store is ``$WARDEN_HOME/tokens.db``, its own SQLite file (mode 0600, WAL): ``warden token``
changes it while the daemon runs, and the daemon reads the token's row on every request, with
no cache, so a revoked or expired token fails on its very next request.

The daemon's older single token, ``$WARDEN_HOME/api-token``, is imported as a token of the
principal ``admin`` (roles ``admin``, :meth:`TokenStore.import_api_token`) each time the daemon
starts: it keeps working, without the prefix, and shows up in the list (source ``api-token``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from warden._errors import AuthenticationError, SpecError, TokenNotFoundError, WardenError
from warden.config import PRIVATE_FILE, Paths, open_private, private_dir

TOKENS_DB = "tokens.db"
PREFIX = "wdn"
SECRET_BYTES = 32
ID_HEX = 12
API_TOKEN_SOURCE = "api-token"  # noqa: S105 - a source's name, not a secret
API_TOKEN_PRINCIPAL = "admin"  # noqa: S105 - a principal name
TOUCH_EVERY_S = 60.0
"""``last_used`` is written at most this often per token: a request costs a read, not a write."""

_TOKEN = re.compile(rf"{PREFIX}_([0-9a-f]{{{ID_HEX}}})_([A-Za-z0-9_-]{{43}})")
_LEGACY = re.compile(r"[\x21-\x7e]{16,512}")
_NAME = re.compile(r"[a-z_][a-z0-9_.@-]{0,63}")
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

State = Literal["active", "expired", "revoked"]


@dataclass(frozen=True)
class TokenInfo:
    """What the store knows of a token: never its secret."""

    id: str
    name: str
    roles: frozenset[str]
    created: float
    expires: float | None = None
    revoked: float | None = None
    last_used: float | None = None
    source: str = "cli"

    def state(self, now: float | None = None) -> State:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and (time.time() if now is None else now) >= self.expires:
            return "expired"
        return "active"


@dataclass(frozen=True)
class NewToken:
    """A token just made: its text is shown once, and kept nowhere."""

    info: TokenInfo
    text: str = field(repr=False)


def token_digest(text: str) -> str:
    """The stored form of a token: hex SHA-256 of its whole text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def format_token(token_id: str, secret: bytes) -> str:
    b64 = base64.urlsafe_b64encode(secret).decode("ascii").rstrip("=")
    return f"{PREFIX}_{token_id}_{b64}"


def parse_token(text: str) -> str:
    """The id of a well-formed ``wdn_<id>_<secret>`` token; :class:`AuthenticationError`
    (saying only "invalid") for anything else."""
    match = _TOKEN.fullmatch(text)
    if match is None:
        raise AuthenticationError(_invalid())
    return match.group(1)


def check_name(name: str) -> str:
    """A principal name: lower-case letters, digits, ``_.@-``, at most 64, not ``uid:N``."""
    if not _NAME.fullmatch(name):
        raise SpecError(
            f"principal name {name!r}: use 1-64 of a-z 0-9 _ . @ -, starting with a letter or _"
        )
    return name


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    found = frozenset(roles)
    for role in found:
        if not _ROLE.fullmatch(role):
            raise SpecError(f"role {role!r}: use 1-32 of a-z 0-9 _ -, starting with a letter")
    if not found:
        raise SpecError("a token needs at least one role (e.g. --role user)")
    return found


def parse_expiry(text: str, now: float | None = None) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s`` from now, or a date (``2026-12-31``: its
    start, UTC) or an ISO date-time (UTC unless it says); it must be in the future."""
    now = time.time() if now is None else now
    match = _DURATION.fullmatch(text.strip())
    if match:
        when = now + int(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        try:
            parsed = (
                datetime.combine(date.fromisoformat(text), datetime.min.time())
                if len(text) == 10
                else datetime.fromisoformat(text)
            )
        except ValueError:
            raise SpecError(
                f"expiry {text!r} is neither a duration (30d, 12h, 90m, 2w) nor a date "
                "(2026-12-31) or ISO date-time"
            ) from None
        when = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if when <= now:
        raise SpecError(f"expiry {text!r} is not in the future")
    return when


def _invalid() -> str:
    return (
        "invalid API token: it is not one this daemon issued (`warden token create` makes "
        "one; WARDEN_TOKEN for the CLI/SDK)"
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    last_used REAL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_name ON tokens(name);
"""


class TokenStore:
    """The tokens of one ``$WARDEN_HOME``. Thread-safe; several processes may use the file at
    once (WAL: every write is one short transaction, and readers never wait for writers).

    Reads and writes have a connection each, under its own lock: the daemon reads on its event
    loop, and a write waiting for another process's lock (``touch``, in a thread) never holds
    up a read."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._lock = threading.Lock()
        _create(path)  # before any connection: closing an fd of the file drops SQLite's locks
        self._conn = _connect(path, busy_timeout_ms)
        self._write_lock = threading.Lock()
        self._write_conn = _connect(path, busy_timeout_ms)

    @classmethod
    def open(cls, paths: Paths | None = None) -> TokenStore:
        return cls((paths or Paths.from_env()).home / TOKENS_DB)

    def close(self) -> None:
        with self._lock, self._write_lock:
            self._conn.close()
            self._write_conn.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(
        self,
        name: str,
        roles: Iterable[str],
        expires: float | None = None,
        *,
        source: str = "cli",
        text: str | None = None,
    ) -> NewToken:
        """A new token of principal ``name``; its text is only in the result. ``text`` imports
        a token made elsewhere (the legacy ``api-token``) instead of making a secret."""
        info = TokenInfo(
            id=secrets.token_hex(ID_HEX // 2),
            name=check_name(name),
            roles=check_roles(roles),
            created=time.time(),
            expires=expires,
            source=source,
        )
        text = (
            text if text is not None else format_token(info.id, secrets.token_bytes(SECRET_BYTES))
        )
        with self._write() as conn:
            conn.execute(
                "INSERT INTO tokens (id, digest, name, roles, created, expires, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (info.id, token_digest(text), info.name, json.dumps(sorted(info.roles)),
                 info.created, info.expires, info.source),
            )  # fmt: skip
        return NewToken(info, text)

    def all(self) -> list[TokenInfo]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM tokens ORDER BY created, id").fetchall()
        return [_info(row) for row in rows]

    def revoke(self, id_or_name: str) -> list[TokenInfo]:
        """Revoke the token of that id, or else every active token of that principal name;
        the tokens revoked now (none if they were already)."""
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                "SELECT * FROM tokens WHERE id = ? OR name = ?", (id_or_name,) * 2
            ).fetchall()
            found = [_info(row) for row in rows]
            by_id = [t for t in found if t.id == id_or_name]
            targets = [t for t in by_id or found if t.revoked is None]
            conn.executemany(
                "UPDATE tokens SET revoked = ? WHERE id = ?", [(now, t.id) for t in targets]
            )
        if not found:
            raise TokenNotFoundError(
                f"no token has the id or principal name {id_or_name!r} (`warden token list`)"
            )
        return targets

    def authenticate(self, text: str | None, now: float | None = None) -> TokenInfo:
        """The active token whose text this is, or :class:`AuthenticationError` saying whether
        it was missing, invalid, expired or revoked."""
        if not text:
            raise AuthenticationError(
                "no API token: send Authorization: Bearer <token> (`warden token create` makes "
                "one; WARDEN_TOKEN for the CLI/SDK)"
            )
        info = self._find(text)
        state = info.state(now)
        if state == "expired":
            raise AuthenticationError(
                "expired API token: ask for a new one (`warden token create`)"
            )
        if state == "revoked":
            raise AuthenticationError(
                "revoked API token: ask for a new one (`warden token create`)"
            )
        return info

    def _find(self, text: str) -> TokenInfo:
        digest = token_digest(text)
        if text.startswith(f"{PREFIX}_"):
            token_id = parse_token(text)
            with self._read() as conn:
                rows = conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchall()
        elif _LEGACY.fullmatch(text):
            with self._read() as conn:
                rows = conn.execute(
                    "SELECT * FROM tokens WHERE source = ?", (API_TOKEN_SOURCE,)
                ).fetchall()
        else:
            raise AuthenticationError(_invalid())
        for row in rows:
            if hmac.compare_digest(str(row["digest"]), digest):
                return _info(row)
        raise AuthenticationError(_invalid())

    def touch(self, token_id: str, now: float | None = None) -> None:
        """Record a use of the token (at most once per :data:`TOUCH_EVERY_S`)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "UPDATE tokens SET last_used = ? WHERE id = ? "
                "AND (last_used IS NULL OR last_used < ?)",
                (now, token_id, now - TOUCH_EVERY_S),
            )

    def import_api_token(self, text: str) -> TokenInfo | None:
        """Make the legacy ``api-token`` ``text`` a token of principal ``admin`` (roles
        ``admin``), unless it is one already; revoke an earlier import of another text (the
        file was deleted to rotate it). The newly imported token, or None."""
        digest = token_digest(text)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM tokens WHERE source = ?", (API_TOKEN_SOURCE,)
            ).fetchall()
        current = {r["id"] for r in rows if hmac.compare_digest(str(r["digest"]), digest)}
        for row in rows:
            if row["id"] not in current and row["revoked"] is None:
                self.revoke(str(row["id"]))
        if current:
            return None
        new = self.create(API_TOKEN_PRINCIPAL, {"admin"}, source=API_TOKEN_SOURCE, text=text)
        return new.info

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._write_conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            except sqlite3.Error as exc:
                raise WardenError(f"token database {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise WardenError(f"token database {self.path}: {exc}") from exc


def _info(row: sqlite3.Row) -> TokenInfo:
    return TokenInfo(
        id=str(row["id"]),
        name=str(row["name"]),
        roles=frozenset(json.loads(row["roles"])),
        created=float(row["created"]),
        expires=row["expires"],
        revoked=row["revoked"],
        last_used=row["last_used"],
        source=str(row["source"]),
    )


def _create(path: Path) -> None:
    """Make the file 0600 before SQLite opens it (its -wal and -shm files get the same mode).

    Only before this process has a connection to it: closing any fd of a file drops every
    POSIX lock the process holds on it, SQLite's included (the SQLite docs' "How To Corrupt
    An SQLite Database File", 2.2)."""
    if not path.parent.exists():
        private_dir(path.parent)
    try:
        if path.exists():
            os.chmod(path, PRIVATE_FILE)  # no fd opened: another store of ours may be open
        else:
            os.close(open_private(path, os.O_RDWR | os.O_CREAT))
    except OSError as exc:
        raise WardenError(
            f"cannot open the token database {path}: {exc} (token commands run as the "
            "daemon's user, root)"
        ) from None


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise WardenError(
            f"cannot open the token database {path}: {exc} (token commands run as the "
            "daemon's user, root)"
        ) from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        conn.close()
        raise WardenError(f"cannot use the token database {path}: {exc}") from None
    return conn
