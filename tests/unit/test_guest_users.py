"""The ``user`` key: commands and file operations as the unprivileged user (uid 1000) by
default, or as root.

The agent runs on the host here (no VM: this is about the agent's own switching), so these
tests need root, like the agent in a guest; tests/security/test_workload_isolation.py checks
the same in a real VM.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.guest_raw import RawHost, user_dir
from warden.wire.frame import Channel, FrameType, decode_json, encode_header, encode_json
from warden.wire.ops import USER_GID, USER_UID, ErrorKind

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir the user can reach (pytest's tmp_path is inside a root-only dir)."""
    path = Path(tempfile.mkdtemp(prefix="warden-guest-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def home(base: Path) -> Path:
    return user_dir(base / "home")


@pytest.fixture
def host(tmp_path: Path, home: Path) -> Iterator[RawHost]:
    raw = RawHost(tmp_path / "agent.log", home)
    raw.hello([2])
    try:
        yield raw
    finally:
        code = raw.close()
        assert "Traceback" not in raw.output(), raw.output()
        assert code == 0, raw.output()


@pytest.fixture
def secret(base: Path) -> Path:
    """A root-only dir holding a root-only file."""
    private = base / "private"
    private.mkdir(mode=0o700)
    (private / "key").write_bytes(b"secret")
    (private / "key").chmod(0o600)
    return private


def call(host: RawHost, args: dict[str, Any], rid: int = 1) -> tuple[dict[str, bytes], Any]:
    host.request(rid, args)
    return host.response(rid)


def write(host: RawHost, path: Path, data: bytes, **extra: Any) -> dict[str, Any]:
    host.request(1, {"op": "write", "path": str(path), **extra})
    host.send(encode_header(FrameType.DATA, 1, Channel.FILE, len(data)) + data)
    host.send(encode_header(FrameType.EOF, 1, Channel.FILE, 0))
    response: dict[str, Any] = host.response(1)[1]
    return response


def test_exec_runs_as_the_user_by_default(host: RawHost, home: Path) -> None:
    script = "id -u; id -g; id -G; echo $HOME $USER $LOGNAME; pwd"
    streams, response = call(host, {"op": "exec", "shell": script})
    assert response["exit_code"] == 0, streams
    lines = streams["stdout"].decode().splitlines()
    assert lines == ["1000", "1000", "1000", f"{home} user user", str(home)]


def test_exec_as_root(host: RawHost) -> None:
    script = "id -u; echo $HOME $USER; pwd"
    streams, _ = call(host, {"op": "exec", "shell": script, "user": "root"})
    assert streams["stdout"].decode().splitlines() == ["0", "/root root", "/root"]


@pytest.mark.parametrize("user", ["nobody", "", 0, None, ["root"]])
def test_any_other_user_is_invalid(host: RawHost, user: object, base: Path) -> None:
    requests: list[dict[str, Any]] = [
        {"op": "exec", "argv": ["true"]},
        {"op": "read", "path": "/etc/hostname"},
        {"op": "write", "path": str(base / "x")},
        {"op": "stat", "path": "/"},
        {"op": "list", "path": "/"},
        {"op": "mkdir", "path": str(base / "d")},
        {"op": "remove", "path": str(base / "d")},
    ]
    for rid, args in enumerate(requests, start=1):
        _, response = call(host, {**args, "user": user}, rid)
        assert response["ok"] is False and response["error"] == ErrorKind.INVALID, response
        assert "'user' must be 'user' or 'root'" in response["message"]
    assert not (base / "x").exists() and not (base / "d").exists()


def test_a_file_written_by_default_belongs_to_the_user(host: RawHost, home: Path) -> None:
    assert write(host, home / "f", b"data", mode=0o640)["ok"] is True
    st = (home / "f").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (USER_UID, USER_GID, 0o640)
    _, mkdir = call(host, {"op": "mkdir", "path": str(home / "a" / "b"), "parents": True}, 2)
    assert mkdir["ok"] is True
    assert (home / "a" / "b").stat().st_uid == USER_UID


def test_file_ops_have_the_users_permissions(host: RawHost, secret: Path) -> None:
    key = str(secret / "key")
    for rid, args in enumerate(
        [
            {"op": "read", "path": key},
            {"op": "stat", "path": key},
            {"op": "list", "path": str(secret)},
            {"op": "remove", "path": key},
            {"op": "mkdir", "path": str(secret / "d")},
        ],
        start=1,
    ):
        streams, response = call(host, args, rid)
        assert (response["ok"], response.get("errno")) == (False, 13), (args, response)
        assert "file" not in streams  # not a byte of the file
    assert write(host, secret / "new", b"x")["errno"] == 13
    assert sorted(os.listdir(secret)) == ["key"]  # no temp file left either


def test_root_file_ops(host: RawHost, secret: Path) -> None:
    streams, response = call(host, {"op": "read", "path": str(secret / "key"), "user": "root"})
    assert (streams["file"], response["ok"]) == (b"secret", True)
    assert write(host, secret / "new", b"x", user="root")["ok"] is True
    assert (secret / "new").stat().st_uid == 0


def test_no_session_defaults_to_root(host: RawHost) -> None:
    """Session version 1 ran a request without ``user`` as root. It is gone: a HELLO offering
    only it is refused, and such a request in the next session runs as the user."""
    host.send(encode_json(FrameType.HELLO, 0, {"versions": [1], "nonce": "old host"}))
    error = host.recv()
    assert error.type == FrameType.ERROR
    assert "no common protocol version" in decode_json(error)["message"]
    host.hello([1, 2])
    streams, _ = call(host, {"op": "exec", "argv": ["id", "-u"]})
    assert streams["stdout"] == b"%d\n" % USER_UID
