"""The token store (auth/tokens.py) and the unix role mapping (auth/unix.py), without a daemon.

The daemon-level checks (401s over TCP, revoke while running, no secret in the log) are in
tests/security/test_tokens.py.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from warden._errors import AuthenticationError, SpecError, WardenError
from warden.auth.tokens import (
    API_TOKEN_SOURCE,
    TokenStore,
    check_name,
    parse_expiry,
    parse_token,
)
from warden.auth.unix import Peer, UnixRoles, peer_credentials, principal_for_peer


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.db")


def _all_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


def test_only_the_hash_is_stored_and_the_file_is_private(store: TokenStore, tmp_path: Path) -> None:
    new = store.create("alice", ["user"])
    prefix, token_id, secret = new.text.split("_", 2)
    assert (prefix, token_id) == ("wdn", new.info.id) and len(secret) == 43
    raw = _all_bytes(tmp_path)
    assert secret.encode() not in raw and new.text.encode() not in raw
    assert hashlib.sha256(new.text.encode()).hexdigest().encode() in raw
    assert oct((tmp_path / "tokens.db").stat().st_mode & 0o777) == "0o600"
    assert "secret" not in repr(new) and new.text not in repr(new)
    info = store.authenticate(new.text)
    assert (info.name, info.roles, info.id) == ("alice", frozenset({"user"}), new.info.id)


def test_two_tokens_differ_and_a_wrong_secret_is_invalid(store: TokenStore) -> None:
    a, b = store.create("alice", ["user"]), store.create("alice", ["user"])
    assert a.text != b.text and a.info.id != b.info.id
    forged = a.text[:-4] + ("AAAA" if not a.text.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthenticationError, match="invalid") as wrong_secret:
        store.authenticate(forged)
    unknown_id = "wdn_000000000000_" + a.text.split("_", 2)[2]
    with pytest.raises(AuthenticationError, match="invalid") as wrong_id:
        store.authenticate(unknown_id)
    assert str(wrong_secret.value) == str(wrong_id.value)  # says nothing of which ids exist


@pytest.mark.parametrize(
    "text",
    [
        "wdn_",
        "wdn_abc_def",
        "wdn_0123456789ab_short",
        "wdn_0123456789AB_" + "a" * 43,  # upper-case id
        "wdn_0123456789ab_" + "a" * 42 + "!",
        "wdn_0123456789ab_" + "a" * 44,
        "short",
        "x" * 600,
        "with space inside it, long enough",
        "tab\there-and-long-enough-to-be-legacy",
        "é" * 20,
    ],
)
def test_malformed_tokens_are_invalid(store: TokenStore, text: str) -> None:
    store.create("alice", ["user"])
    with pytest.raises(AuthenticationError, match="invalid"):
        store.authenticate(text)


def test_parse_token() -> None:
    assert parse_token("wdn_0123456789ab_" + "A-_z" * 10 + "abc") == "0123456789ab"
    with pytest.raises(AuthenticationError):
        parse_token("wdn_0123456789ab_" + "a" * 43 + "\n")


@pytest.mark.parametrize("text", [None, ""])
def test_missing(store: TokenStore, text: str | None) -> None:
    with pytest.raises(AuthenticationError, match="no API token"):
        store.authenticate(text)


def test_expiry(store: TokenStore) -> None:
    now = time.time()
    new = store.create("ci", ["user"], expires=now + 60)
    assert store.authenticate(new.text, now=now + 59).name == "ci"
    with pytest.raises(AuthenticationError, match="expired"):
        store.authenticate(new.text, now=now + 60)
    assert store.all()[0].state(now + 61) == "expired"


def test_revoke_by_id_and_by_name(store: TokenStore) -> None:
    a1, a2 = store.create("alice", ["user"]), store.create("alice", ["user"])
    b = store.create("bob", ["user"])
    assert [t.id for t in store.revoke(a1.info.id)] == [a1.info.id]
    with pytest.raises(AuthenticationError, match="revoked"):
        store.authenticate(a1.text)
    assert store.authenticate(a2.text).name == "alice"
    assert [t.id for t in store.revoke("alice")] == [a2.info.id]  # a1 was revoked already
    assert store.revoke("alice") == []
    with pytest.raises(AuthenticationError, match="revoked"):
        store.authenticate(a2.text)
    assert store.authenticate(b.text).name == "bob"
    with pytest.raises(WardenError, match="no token"):
        store.revoke("carol")


def test_a_revoke_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    """The daemon's store holds its connection open; the CLI's revoke is another connection."""
    daemon = TokenStore(tmp_path / "tokens.db")
    new = daemon.create("alice", ["user"])
    assert daemon.authenticate(new.text).name == "alice"
    with TokenStore(tmp_path / "tokens.db") as cli:
        cli.revoke(new.info.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        daemon.authenticate(new.text)


def test_the_legacy_api_token_is_an_admin_token(store: TokenStore) -> None:
    legacy = "Zx" * 22
    imported = store.import_api_token(legacy)
    assert imported is not None and imported.source == API_TOKEN_SOURCE
    assert store.import_api_token(legacy) is None  # once
    info = store.authenticate(legacy)
    assert (info.name, info.roles) == ("admin", frozenset({"admin"}))
    rotated = "Qy" * 22
    assert store.import_api_token(rotated) is not None
    with pytest.raises(AuthenticationError, match="revoked"):
        store.authenticate(legacy)
    assert store.authenticate(rotated).name == "admin"


def test_touch_records_use_at_most_once_a_minute(store: TokenStore) -> None:
    new = store.create("alice", ["user"])
    store.touch(new.info.id, now=1000.0)
    store.touch(new.info.id, now=1030.0)
    assert store.all()[0].last_used == 1000.0
    store.touch(new.info.id, now=1061.0)
    assert store.all()[0].last_used == 1061.0


@pytest.mark.parametrize("name", ["", "Alice", "uid:0", "a b", "-x", "x" * 65, "root\n"])
def test_bad_principal_names(name: str) -> None:
    with pytest.raises(SpecError):
        check_name(name)


def test_roles_are_checked(store: TokenStore) -> None:
    with pytest.raises(SpecError, match="at least one role"):
        store.create("alice", [])
    with pytest.raises(SpecError, match="role"):
        store.create("alice", ["Admin!"])


def test_parse_expiry() -> None:
    now = 1_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("90m", now) == now + 5400
    assert parse_expiry("2w", now) == now + 14 * 86400
    assert parse_expiry("2026-12-31", now) == 1798675200.0  # its start, UTC
    assert parse_expiry("2026-12-31T12:00:00+01:00", now) == 1798714800.0
    for bad in ("0d", "1970-01-02", "tomorrow", "30 days", "-1d", "3y"):
        with pytest.raises(SpecError):
            parse_expiry(bad, now)


def test_a_database_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(WardenError, match="token database"):
        TokenStore(path)


def test_a_change_made_behind_our_back_is_read(store: TokenStore, tmp_path: Path) -> None:
    """No cache: a row changed by plain SQL (an expiry set) counts on the next check."""
    new = store.create("alice", ["user"])
    with sqlite3.connect(tmp_path / "tokens.db") as conn:
        conn.execute("UPDATE tokens SET expires = 1")
    with pytest.raises(AuthenticationError, match="expired"):
        store.authenticate(new.text)


# -- unix peers ---------------------------------------------------------------------------


def test_roles_for_unix() -> None:
    roles = UnixRoles(admin_uids=frozenset({0}), group_roles={500: frozenset({"user"})})
    assert roles.roles_for_unix(0, []) == {"admin"}
    assert roles.roles_for_unix(1000, [100, 500]) == {"user"}
    assert roles.roles_for_unix(1000, [100]) == frozenset()
    default = UnixRoles.default(group=None)
    assert default.roles_for_unix(0, []) == {"admin"}
    assert default.roles_for_unix(os.geteuid(), []) == {"admin"}
    assert default.roles_for_unix(54321, [54321]) == frozenset()


def test_principal_for_peer_names_the_uid() -> None:
    roles = UnixRoles(group_roles={777: frozenset({"user"})})
    p = principal_for_peer(Peer(pid=1, uid=0, gid=0), roles)
    assert (p.name, p.roles, p.via, p.uid) == ("root", frozenset({"admin"}), "unix", 0)
    p = principal_for_peer(Peer(pid=1, uid=61234, gid=61234, groups=frozenset({777})), roles)
    assert (p.name, p.roles, p.uid) == ("uid:61234", frozenset({"user"}), 61234)


def test_peer_credentials_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= peer.gids and peer.name == pwd.getpwuid(os.getuid()).pw_name
