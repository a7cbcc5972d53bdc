"""Who the daemon's workloads run as: the guest's unprivileged user by default, root only on a
request that asks for it (``"user": "root"``) from a principal the access policy grants
``exec-as-root`` (here the daemon's admin, under the shipped default policy).

The 403 for a principal without exec-as-root is in test_access_matrix.py; this module runs its
own daemon (one daemon per $WARDEN_HOME, so not beside another module's), with one real VM.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import serving
from warden import records
from warden.wire.ops import USER_HOME, USER_UID

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    tmp = tmp_path_factory.mktemp("root-access")
    with serving(tmp) as serve, serve.client() as http:
        r = http.post("/v1/sandboxes", json={"memory_mib": 256})
        assert r.status_code == 201, r.text
        yield http, f"/v1/sandboxes/{r.json()['id']}"


def _stdout(response: httpx.Response) -> bytes:
    """The stdout of an exec response (binary records), checking it ended with exit code 0."""
    assert response.status_code == 200, response.text[:500]
    decoder = records.RecordDecoder()
    got = decoder.feed(response.content)
    decoder.end()
    assert got[-1] == (records.Kind.CONTROL, {"exit_code": 0, "signal": None, "timed_out": False})
    return b"".join(p for k, p in got if k is records.Kind.STDOUT and isinstance(p, bytes))


def test_exec_runs_as_the_user_unless_root_is_asked_for(vm: tuple[httpx.Client, str]) -> None:
    http, base = vm
    default = _stdout(http.post(f"{base}/exec", json={"cmd": ["sh", "-c", "id -u; pwd"]}))
    assert default == f"{USER_UID}\n{USER_HOME}\n".encode()
    root = _stdout(http.post(f"{base}/exec", json={"cmd": ["id", "-u"], "user": "root"}))
    assert root == b"0\n"


def test_files_run_as_the_user_unless_root_is_asked_for(vm: tuple[httpx.Client, str]) -> None:
    http, base = vm
    r = http.put(f"{base}/files", params={"path": "/root/secret"}, content=b"x")
    assert r.status_code == 400 and "Permission denied" in r.text, r.text
    r = http.put(f"{base}/files", params={"path": "/root/secret", "user": "root"}, content=b"x")
    assert r.status_code == 200, r.text
    r = http.get(f"{base}/files", params={"path": "/root/secret"})
    assert r.status_code == 400, r.text
    r = http.get(f"{base}/files", params={"path": "/root/secret", "user": "root"})
    assert r.status_code == 200 and r.content == b"x"
    r = http.put(f"{base}/files", params={"path": f"{USER_HOME}/mine"}, content=b"y")
    assert r.status_code == 200, r.text
