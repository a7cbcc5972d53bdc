"""The daemon's TCP listener: TLS with a self-signed certificate, and a bearer token.

A real `warden serve --tcp` on 127.0.0.1, and real VMs behind it for the SDK and CLI checks.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

import warden
from warden import HostError
from warden.config import Paths

from .conftest import WARDEN, ServeProcess

pytestmark = pytest.mark.vm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpDaemon(ServeProcess):
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        super().__init__(
            tmp / "w.sock",
            tmp / "daemon.log",
            args=["--log-level", "warning", "--tcp", f"127.0.0.1:{self.port}"],
        )
        home = Paths.from_env().home
        self.https = f"https://127.0.0.1:{self.port}"
        self.ca_cert = home / "tls" / "server.crt"
        self.token_file = home / "api-token"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def https_client(self, token: str | None, *, verify: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        context = ssl.create_default_context(cafile=str(self.ca_cert)) if verify else False
        return httpx.Client(base_url=self.https, headers=headers, verify=context, timeout=30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpDaemon]:
    d = TcpDaemon(tmp_path_factory.mktemp("tcp"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_the_token_and_key_are_private_and_the_cert_names_the_host(daemon: TcpDaemon) -> None:
    assert oct(daemon.token_file.stat().st_mode & 0o777) == "0o600"
    assert len(daemon.token) >= 32
    key = daemon.ca_cert.with_name("server.key")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(daemon.ca_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_every_request_needs_the_token(daemon: TcpDaemon) -> None:
    with daemon.https_client(None) as c:
        r = c.get("/v1/info")
        assert r.status_code == 401 and "no API token" in r.json()["error"]["message"]
        assert c.get("/v1/sandboxes").status_code == 401
        assert c.post("/v1/sandboxes", json={}).status_code == 401  # nothing is created
    with daemon.https_client("not-the-token") as c:
        r = c.get("/v1/info")
        assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
    with daemon.https_client(daemon.token) as c:
        assert c.get("/v1/info").status_code == 200
    with daemon.client() as c:  # the unix socket: its file mode is the guard
        assert c.get("/v1/info").status_code == 200
        assert c.get("/v1/sandboxes").json() == []


def test_only_tls_is_spoken_and_an_unknown_cert_is_refused(daemon: TcpDaemon) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{daemon.port}/v1/info", timeout=10)
    with pytest.raises(HostError, match="WARDEN_CA_CERT"):
        warden.connect(daemon.https, token=daemon.token)  # the system CAs do not know it


def test_sdk_and_cli_over_tcp(daemon: TcpDaemon) -> None:
    client = warden.connect(daemon.https, token=daemon.token, ca_cert=str(daemon.ca_cert))
    with client.Sandbox.create(memory_mib=128) as sbx:
        assert sbx.commands.run("echo over tls").stdout == "over tls\n"
        env = {
            **os.environ,
            "WARDEN_HOST": daemon.https,
            "WARDEN_TOKEN": daemon.token,
            "WARDEN_CA_CERT": str(daemon.ca_cert),
        }
        p = subprocess.run(
            [WARDEN, "exec", sbx.id, "--", "sh", "-c", "echo $((6 * 7)); exit 3"],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert (p.returncode, p.stdout) == (3, b"42\n"), p.stderr
        p = subprocess.run(
            [WARDEN, "ps", "--format", "json"],
            capture_output=True,
            env={**env, "WARDEN_TOKEN": "wrong"},
            timeout=60,
            check=False,
        )
        assert p.returncode != 0 and b"token" in p.stderr


@pytest.mark.parametrize(
    ("where", "message"),
    [("nonsense", "HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT"), ("192.0.2.1:8443", "listen")],
)
def test_a_bad_tcp_address_is_refused_cleanly(tmp_path: Path, where: str, message: str) -> None:
    sock = tmp_path / "w.sock"
    env = {**os.environ, "WARDEN_HOME": str(tmp_path / "home")}  # not the module daemon's
    p = subprocess.run(
        [WARDEN, "serve", "--socket", str(sock), "--tcp", where],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert p.returncode == 1 and message.encode() in p.stderr, p.stderr
    assert not sock.exists()
