"""API tokens against a real daemon: a `warden serve --tcp` subprocess, tokens made and revoked
with the real `warden token` CLI while it runs. No VM is needed (``--charge limits`` skips the
footprint calibration boot).

- a valid token works, and the daemon sees its principal (GET /v1/whoami);
- missing, invalid, expired and revoked tokens get 401 + ``WWW-Authenticate: Bearer``, each
  saying which, none saying which token ids exist;
- a revoke while the daemon runs fails the token's very next request, on the same keep-alive
  connection (no cache);
- the token's text and secret are in no file of the store and not in the daemon's log;
- the legacy ``api-token`` keeps working, as principal ``admin``.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import warden
from tests.integration.conftest import WARDEN, ServeProcess
from warden.config import Paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon(ServeProcess):
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        super().__init__(
            tmp / "w.sock",
            tmp / "daemon.log",
            args=["--log-level", "debug", "--charge", "limits", "--tcp", f"127.0.0.1:{self.port}"],
        )
        self.home = Paths.from_env().home

    def https(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        ca = ssl.create_default_context(cafile=str(self.home / "tls" / "server.crt"))
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.port}", headers=headers, verify=ca, timeout=30
        )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("tokens"))
    d.start()
    # `warden token` goes through the daemon that answers (it records the change in the
    # audit log, whose one writer it is): this one, on its own socket.
    before = os.environ.get("WARDEN_HOST")
    os.environ["WARDEN_HOST"] = d.url
    try:
        yield d
    finally:
        if before is None:
            os.environ.pop("WARDEN_HOST", None)
        else:
            os.environ["WARDEN_HOST"] = before
        d.stop()


def _token(*args: str) -> tuple[str, str]:
    """``warden token create ARGS``: (the token's text, its id)."""
    p = subprocess.run(
        [WARDEN, "token", "create", *args], capture_output=True, text=True, timeout=60, check=True
    )
    text = p.stdout.strip()
    assert text.count("\n") == 0 and text.startswith("wdn_"), p.stdout
    return text, text.split("_")[1]


def _refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "AuthenticationError" and error["message"].startswith(what), error


def test_a_valid_token_works_and_names_its_principal(daemon: Daemon) -> None:
    text, token_id = _token("alice", "--role", "user", "--role", "ci", "--expires", "1d")
    with daemon.https(text) as c:
        r = c.get("/v1/whoami")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "name": "alice", "roles": ["ci", "user"], "via": "token", "uid": None,
            "token_id": token_id,
        }  # fmt: skip
        assert c.get("/v1/sandboxes").status_code == 200
        # /v1/info is the daemon's (the policy's admin action), and alice is a user
        r = c.get("/v1/info")
        assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError"


def test_missing_and_invalid_tokens_get_401(daemon: Daemon) -> None:
    text, _ = _token("alice")
    with daemon.https(None) as c:
        _refused(c.get("/v1/info"), "no API token")
        _refused(c.post("/v1/sandboxes", json={}), "no API token")  # nothing is created
        _refused(c.get("/v1/info", headers={"Authorization": "Basic YTpi"}), "invalid")
    with daemon.https("not-a-token") as c:
        _refused(c.get("/v1/info"), "invalid")
    secret = text.split("_", 2)[2]
    with daemon.https(f"wdn_{'0' * 12}_{secret}") as c:  # a secret that exists, another id
        unknown_id = c.get("/v1/info")
    with daemon.https(text[:-3] + ("aaa" if not text.endswith("aaa") else "bbb")) as c:
        wrong_secret = c.get("/v1/info")
    _refused(unknown_id, "invalid")
    assert unknown_id.json() == wrong_secret.json()  # no word of which ids exist


def test_an_expired_token_gets_401(daemon: Daemon) -> None:
    text, _ = _token("shortlived", "--expires", "2s")
    with daemon.https(text) as c:
        assert c.get("/v1/whoami").status_code == 200
        time.sleep(2.2)
        _refused(c.get("/v1/whoami"), "expired")


def test_a_revoke_while_the_daemon_runs_fails_the_next_request(daemon: Daemon) -> None:
    text, token_id = _token("bob")
    with daemon.https(text) as c:  # one keep-alive connection throughout
        assert c.get("/v1/whoami").json()["name"] == "bob"
        subprocess.run([WARDEN, "token", "revoke", token_id], check=True, timeout=60)
        _refused(c.get("/v1/whoami"), "revoked")
        _refused(c.get("/v1/sandboxes"), "revoked")
    listed = subprocess.run(
        [WARDEN, "token", "list", "--json"], capture_output=True, text=True, check=True
    ).stdout
    row = next(t for t in json.loads(listed) if t["id"] == token_id)
    assert row["state"] == "revoked" and row["last_used"] is not None
    ca = str(daemon.home / "tls" / "server.crt")
    with pytest.raises(warden.AuthenticationError, match="revoked"):  # the SDK's class
        warden.connect(f"https://127.0.0.1:{daemon.port}", token=text, ca_cert=ca)


def test_on_the_unix_socket_a_token_selects_its_principal(daemon: Daemon) -> None:
    text, _ = _token("carol")
    with daemon.client() as c:
        assert c.get("/v1/whoami").json()["via"] == "unix"  # root, by its peer credentials
        who = c.get("/v1/whoami", headers={"Authorization": f"Bearer {text}"}).json()
        assert (who["name"], who["via"]) == ("carol", "token")
        _refused(c.get("/v1/whoami", headers={"Authorization": "Bearer nope"}), "invalid")


def test_the_legacy_api_token_is_an_admin_token(daemon: Daemon) -> None:
    legacy = (daemon.home / "api-token").read_text().strip()
    with daemon.https(legacy) as c:
        who = c.get("/v1/whoami").json()
    assert (who["name"], who["roles"], who["via"]) == ("admin", ["admin"], "token")


def test_no_secret_is_stored_or_logged(daemon: Daemon) -> None:
    text, token_id = _token("dave")
    secret = text.split("_", 2)[2]
    with daemon.https(text) as c:
        assert c.get("/v1/whoami").status_code == 200
    with daemon.https(text + "x") as c:  # a refused one is not logged either
        assert c.get("/v1/whoami").status_code == 401
    listed = subprocess.run(
        [WARDEN, "token", "list"], capture_output=True, text=True, check=True, env=os.environ
    ).stdout
    assert token_id in listed and secret not in listed
    for path in [*daemon.home.glob("tokens.db*"), *daemon.home.glob("state.db*"), daemon.log]:
        data = path.read_bytes()
        assert secret.encode() not in data and text.encode() not in data, path
    assert b"GET /v1/whoami" in daemon.log.read_bytes()  # the log was written, at debug
