"""A local user of the daemon's group sees and acts on only their own sandboxes.

A real `warden serve --group G` (``--charge limits``: no calibration boot) in a fresh
``$WARDEN_HOME`` under /tmp that shares the built images and boot snapshots of the real one,
under the shipped default policy. A temporary group (``groupadd``), and a bare numeric uid with
no passwd entry in it (the daemon names it ``uid:N``, role ``user``), switched to with
``setpriv``; its client is /usr/bin/python3 with the standard library only. Root (an admin)
makes one sandbox, the member another: two real VMs.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.security.test_peer_credentials import SYSTEM_PYTHON, Daemon, _free_uids, _serve
from warden.config import Paths

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("setpriv", "groupadd", "groupdel")),
        reason="needs root, setpriv and groupadd",
    ),
]

CLIENT = r"""
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])

c = Unix("warden", timeout=120)
body = sys.argv[4] if len(sys.argv) > 4 else None
c.request(sys.argv[2], sys.argv[3], body=body, headers={"Content-Type": "application/json"})
r = c.getresponse()
data = r.read()
try:
    doc = json.loads(data)
except ValueError:
    doc = None
print(json.dumps({"status": r.status, "body": doc}))
"""


@dataclass
class Setup:
    daemon: Daemon
    gid: int
    member: int

    def root(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.daemon.socket))
        return httpx.Client(transport=transport, base_url="http://warden", timeout=120)

    def as_member(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        ids = [f"--reuid={self.member}", f"--regid={self.member}", f"--groups={self.gid}"]
        argv = [SYSTEM_PYTHON, "-c", CLIENT, str(self.daemon.socket), method, path]
        if body is not None:
            argv.append(json.dumps(body))
        p = subprocess.run(
            ["setpriv", *ids, *argv], capture_output=True, text=True, timeout=180, check=False
        )
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)
        return int(got["status"]), got["body"]


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    group = f"wdnp{secrets.token_hex(3)}"
    subprocess.run(["groupadd", "--system", group], check=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="warden-peer-policy-", dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - the test's dir: only the daemon's modes below count
    real = Paths.from_env().home
    home = base / "home"
    home.mkdir()
    for name in ("cache", "images"):
        (real / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / name).symlink_to(real / name)
    try:
        gid = grp.getgrnam(group).gr_gid
        (member,) = _free_uids(1)
        daemon = _serve(home, "--group", group)
        s = Setup(daemon, gid, member)
        try:
            yield s
        finally:
            with s.root() as c:
                for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                    c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["groupdel", group], check=False, timeout=60)


def test_a_member_sees_and_acts_on_only_its_own_sandboxes(setup: Setup) -> None:
    with setup.root() as c:
        r = c.post("/v1/sandboxes", json={"memory_mib": 128, "name": "roots"})
        assert r.status_code == 201, r.text
        roots = r.json()
        assert roots["owner"] == "root"
    status, mine = setup.as_member("POST", "/v1/sandboxes", {"memory_mib": 128})
    assert status == 201, mine
    assert mine["owner"] == f"uid:{setup.member}"

    status, listed = setup.as_member("GET", "/v1/sandboxes")
    assert status == 200 and [vm["id"] for vm in listed] == [mine["id"]]
    for ref in (roots["id"], "roots"):
        status, body = setup.as_member("GET", f"/v1/sandboxes/{ref}")
        assert status == 404 and body["error"]["type"] == "VMNotFoundError", body
        status, body = setup.as_member("POST", f"/v1/sandboxes/{ref}/stop")
        assert status == 404, body
    status, body = setup.as_member("POST", f"/v1/sandboxes/{mine['id']}/exec", {"cmd": ["true"]})
    assert status == 200, body
    root_exec = {"cmd": ["id"], "user": "root"}
    status, body = setup.as_member("POST", f"/v1/sandboxes/{mine['id']}/exec", root_exec)
    assert status == 403 and "exec-as-root" in body["error"]["message"], body
    status, body = setup.as_member("GET", "/v1/info")
    assert status == 403 and body["error"]["type"] == "PermissionDeniedError", body

    with setup.root() as c:  # the admin sees both, and may act on the member's
        ids = {vm["id"] for vm in c.get("/v1/sandboxes").json()}
        assert ids == {roots["id"], mine["id"]}
        assert c.post(f"/v1/sandboxes/{mine['id']}/stop").status_code == 200
    status, body = setup.as_member("DELETE", f"/v1/sandboxes/{mine['id']}")
    assert status == 204, body
