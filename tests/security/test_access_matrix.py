"""The access policy enforced by the real daemon on real VMs: the access matrix, owner
isolation, exec-as-root, guest operations and a policy reload.

The app runs in this process (uvicorn on a unix socket in a thread with its own loop) over a
Manager with a private $WARDEN_HOME (sharing the built images and boot snapshots of the real
one) whose policy.toml is the shipped default plus a viewer and a rooter role. Until the
authenticating middleware lands, a request's principal comes from a test-only ASGI wrapper
that reads the ``x-test-principal`` header (``name:role,role``): it exists only in this file,
so production has no such path. No header: the app's default, LOCAL_ADMIN.

One VM, alice's, serves the whole module (each boot costs seconds of CPU under TCG): every
route is asked of it by a principal who may not see it (404), one who may see it but not do
the route's action (403), and one who may (2xx). The routes that end or change it (fork,
template, pause, resume, stop, rm) run last, in that order, on it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.integration.conftest import WARDEN
from warden import records
from warden.auth.principal import SCOPE_KEY, Principal
from warden.config import Paths
from warden.policy.access import policy_path
from warden.policy.admission import AdmissionPolicy, HostCapacity
from warden.server import Manager, create_app
from warden.server.access import ROUTES
from warden.vmm.spec import MIN_MEMORY_MIB

pytestmark = pytest.mark.vm

MEMORY = max(128, MIN_MEMORY_MIB)
HEADER = "x-test-principal"
ALICE = "alice:user"
ROOTER = "alice:user,rooter"  # alice, with exec-as-root on her own sandboxes
VERA = "vera"  # [principals] makes her a viewer: inspect on every sandbox, nothing else
MALLORY = "mallory:user"  # a user who owns nothing here
NOBODY = "nobody"  # no role at all
ADMIN = ""  # no header: LOCAL_ADMIN

EXTRA_RULES = """
[principals]
vera = ["viewer"]

[[rules]]
name = "viewers-see-every-sandbox"
roles = ["viewer"]
actions = ["inspect"]

[[rules]]
name = "rooters-are-root-in-their-sandboxes"
roles = ["rooter"]
actions = ["exec-as-root"]
owner = "self"
"""

GUEST_READ_ONLY = """
[[guest]]
name = "team-a-is-read-only"
labels = { team = "a" }
block = ["files-write"]
"""


class HeaderPrincipal:
    """Test only: the request's principal is the one ``x-test-principal`` names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = dict(scope["headers"]).get(HEADER.encode())
            if value:
                name, _, roles = value.decode().partition(":")
                who = Principal(name, frozenset(r for r in roles.split(",") if r), via="token")
                scope = {**scope, SCOPE_KEY: who}
        await self.app(scope, receive, send)


@dataclass
class Daemon:
    socket: Path
    paths: Paths
    vm: str
    base_policy: str

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://warden",
            headers={HEADER: who} if who else {},
            timeout=httpx.Timeout(120.0),
        )

    def call(self, who: str, method: str, url: str, **kw: Any) -> httpx.Response:
        with self.client(who) as c:
            return c.request(method, url.replace("{ref}", self.vm), **kw)

    def reload(self, text: str) -> httpx.Response:
        policy_path(self.paths).write_text(text)
        return self.call(ADMIN, "POST", "/v1/policy/reload")


def _private_home(tmp: Path) -> Paths:
    real = Paths.from_env()
    home = tmp / "home"
    home.mkdir()
    for name in ("cache", "images"):
        (real.home / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / name).symlink_to(real.home / name)
    return Paths(home)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("access")
    paths = _private_home(tmp)
    shipped = resources.files("warden.policy").joinpath("default.toml").read_text("utf-8")
    base_policy = shipped + EXTRA_RULES
    policy_path(paths).write_text(base_policy)
    manager = Manager(
        paths,
        policy=AdmissionPolicy(reserved_host_memory_mib=0),
        capacity=HostCapacity(memory_mib=4 * (MEMORY + AdmissionPolicy().vm_overhead_mib), cpus=4),
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp / "w.sock"))
    sock.listen(64)
    app = HeaderPrincipal(create_app(manager))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    d = Daemon(tmp / "w.sock", paths, "", base_policy)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        r = d.call(
            ALICE, "POST", "/v1/sandboxes", json={"memory_mib": MEMORY, "labels": {"team": "a"}}
        )
        assert r.status_code == 201, r.text
        d.vm = r.json()["id"]
        yield d
    finally:
        with d.client(ADMIN) as c:
            for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive()


def _stdout(r: httpx.Response) -> bytes:
    assert r.status_code == 200, r.text[:500]
    decoder = records.RecordDecoder()
    got = decoder.feed(r.content)
    decoder.end()
    assert isinstance(got[-1][1], dict) and got[-1][1].get("exit_code") == 0, got[-1]
    return b"".join(p for k, p in got if k is records.Kind.STDOUT and isinstance(p, bytes))


# -- the matrix: every route, denied and allowed -------------------------------------------

SB = "/v1/sandboxes/{ref}"


@dataclass(frozen=True)
class Call:
    """One request of a route, with the answer its allowed principal gets."""

    method: str
    path: str
    url: str = ""
    kw: tuple[tuple[str, Any], ...] = ()
    ok: int = 200

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.kw)


SANDBOX_CALLS = [
    Call("GET", SB),
    Call("GET", f"{SB}/logs"),
    Call("GET", f"{SB}/guest"),
    Call("POST", f"{SB}/ping"),
    Call("POST", f"{SB}/exec", kw=(("json", {"cmd": ["true"]}),)),
    Call("PUT", f"{SB}/files", kw=(("params", {"path": "/home/user/m"}), ("content", b"x"))),
    Call("GET", f"{SB}/files", kw=(("params", {"path": "/home/user/m"}),)),
    Call("GET", f"{SB}/files/stat", kw=(("params", {"path": "/home/user/m"}),)),
    Call("GET", f"{SB}/files/list", kw=(("params", {"path": "/home/user"}),)),
    Call("POST", f"{SB}/files/mkdir", kw=(("params", {"path": "/home/user/d"}),)),
    Call("DELETE", f"{SB}/files", kw=(("params", {"path": "/home/user/d"}),), ok=204),
]
"""The routes about alice's sandbox that leave it running, in an order that works."""

LIFECYCLE = [
    Call("POST", f"{SB}/template", kw=(("json", {"name": "pol-t"}),), ok=201),
    Call("POST", f"{SB}/fork", kw=(("json", {"n": 1}),), ok=201),
    Call("POST", f"{SB}/pause"),
    Call("POST", f"{SB}/resume"),
    Call("POST", f"{SB}/stop"),
    Call("DELETE", SB, ok=204),
]
"""The routes that change or end it: run last, in this order."""

STDIN = ("PUT", f"{SB}/execs/{{exec_id}}/stdin")
DAEMON_CALLS = {
    ("GET", "/v1/templates"): (NOBODY, ALICE),
    ("GET", "/v1/info"): (ALICE, ADMIN),
    ("GET", "/metrics"): (ALICE, ADMIN),
    ("POST", "/v1/policy/reload"): (ALICE, ADMIN),
    ("GET", "/v1/tokens"): (ALICE, ADMIN),
}
"""Daemon routes: (a principal denied, one allowed)."""
FILTERED = {("GET", "/v1/sandboxes"), ("GET", "/v1/events")}
OPEN = {("GET", "/v1/whoami")}
LINKS = {("POST", "/v1/links"), ("GET", "/v1/links"), ("DELETE", "/v1/links/{name}")}
"""The link routes (test_links_need_link_on_both_sandboxes)."""
OTHERS = {
    ("POST", "/v1/sandboxes"),
    ("DELETE", "/v1/templates/{name}"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{which}"),
}
"""The create (the module's fixture is alice's create; denied below), the template removal
(in the lifecycle test) and the token changes (test_token_changes_are_admin_only)."""


def test_the_matrix_covers_every_route() -> None:
    covered = {(c.method, c.path) for c in SANDBOX_CALLS + LIFECYCLE}
    covered |= {STDIN, *DAEMON_CALLS, *FILTERED, *OPEN, *OTHERS, *LINKS}
    assert covered == set(ROUTES)


def _denied(d: Daemon, call: Call) -> None:
    """Whoever may not see the sandbox gets 404 (as if it did not exist); who may see it but
    not act gets 403 naming the action and "no rule allows"."""
    action = ROUTES[(call.method, call.path)].action
    for who in (MALLORY, NOBODY):
        r = d.call(who, call.method, call.path, **call.kwargs)
        assert r.status_code == 404, (who, call, r.text)
        assert f"no VM has id or name '{d.vm}'" in r.text
    r = d.call(VERA, call.method, call.path, **call.kwargs)
    if action == "inspect":
        assert r.status_code == call.ok, (call, r.text)
    else:
        assert r.status_code == 403, (call, r.text)
        assert r.json()["error"]["type"] == "PermissionDeniedError"
        assert f"vera may not {action}" in r.text and "no rule" in r.text


@pytest.mark.parametrize("call", SANDBOX_CALLS, ids=lambda c: f"{c.method} {c.path}")
def test_sandbox_routes(daemon: Daemon, call: Call) -> None:
    _denied(daemon, call)
    r = daemon.call(ALICE, call.method, call.path, **call.kwargs)
    assert r.status_code == call.ok, (call, r.text)
    if call.method == "DELETE":  # make it again for the admin's turn
        assert daemon.call(ADMIN, "POST", f"{SB}/files/mkdir", **call.kwargs).status_code == 200
    r = daemon.call(ADMIN, call.method, call.path, **call.kwargs)
    assert r.status_code == call.ok, (call, r.text)


@pytest.mark.parametrize("key", list(DAEMON_CALLS), ids=" ".join)
def test_daemon_routes(daemon: Daemon, key: tuple[str, str]) -> None:
    method, path = key
    denied, allowed = DAEMON_CALLS[key]
    r = daemon.call(denied, method, path)
    assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError", r.text
    assert f"may not {ROUTES[key].action} the daemon" in r.text
    assert daemon.call(allowed, method, path).status_code == 200


def test_whoami_is_open_to_every_caller(daemon: Daemon) -> None:
    for who, name in ((NOBODY, "nobody"), (MALLORY, "mallory"), (ADMIN, "root")):
        r = daemon.call(who, "GET", "/v1/whoami")
        assert r.status_code == 200 and r.json()["name"] == name, r.text


def test_token_changes_are_admin_only(daemon: Daemon) -> None:
    r = daemon.call(ALICE, "POST", "/v1/tokens", json={"name": "alice", "roles": ["admin"]})
    assert r.status_code == 403 and "alice may not admin the daemon" in r.text, r.text
    r = daemon.call(ALICE, "DELETE", "/v1/tokens/alice")
    assert r.status_code == 403, r.text
    r = daemon.call(ADMIN, "POST", "/v1/tokens", json={"name": "pol-t", "roles": ["user"]})
    assert r.status_code == 201, r.text
    assert daemon.call(ADMIN, "DELETE", "/v1/tokens/pol-t").status_code == 200


def test_every_denial_is_in_the_audit_log(daemon: Daemon) -> None:
    """A denied request is answered once its record (outcome denied, the rule) is on disk."""
    from warden import audit

    assert daemon.call(VERA, "POST", f"{SB}/stop").status_code == 403
    assert daemon.call(MALLORY, "GET", SB).status_code == 404  # concealed, still recorded
    r = daemon.call(ALICE, "POST", f"{SB}/exec", json={"cmd": ["id"], "user": "root"})
    assert r.status_code == 403
    denied = [rec for rec in audit.records(daemon.paths.home) if rec["outcome"] == "denied"]
    last = {(rec["principal"], rec["action"]): rec for rec in denied}
    assert last[("vera", "stop")]["sandbox"] == daemon.vm
    assert "no rule" in last[("vera", "stop")]["rule"]
    assert last[("mallory", "inspect")]["sandbox"] == daemon.vm
    assert last[("alice", "exec-as-root")]["roles"] == "user"
    assert audit.verify(daemon.paths.home).ok


def test_reloads_are_in_the_audit_log(daemon: Daemon) -> None:
    from warden import audit

    assert daemon.reload(daemon.base_policy + "\n[[rules]]\n").status_code == 409
    assert daemon.reload(daemon.base_policy).status_code == 200
    done = [r for r in audit.records(daemon.paths.home, action="policy-reload")][-2:]
    assert [(r["outcome"], r["principal"]) for r in done] == [("error", "root"), ("ok", "root")]
    assert "has no name" in done[0]["error"] and done[1]["rules"] == 5


def test_create_needs_the_create_action(daemon: Daemon) -> None:
    r = daemon.call(NOBODY, "POST", "/v1/sandboxes", json={"memory_mib": MEMORY})
    assert r.status_code == 403 and "nobody may not create" in r.text, r.text
    r = daemon.call(ADMIN, "GET", SB)
    assert r.json()["owner"] == "alice"


def test_streamed_stdin_needs_exec(daemon: Daemon) -> None:
    body = {"cmd": ["cat"], "stdin_stream": True}
    out = b""
    with (
        daemon.client(ALICE) as c,
        c.stream("POST", f"/v1/sandboxes/{daemon.vm}/exec", json=body) as r,
    ):
        assert r.status_code == 200
        decoder = records.RecordDecoder()
        for data in r.iter_bytes():
            for kind, msg in decoder.feed(data):
                if isinstance(msg, dict) and "exec_id" in msg:
                    url = STDIN[1].replace("{exec_id}", msg["exec_id"])
                    _denied(daemon, Call("PUT", STDIN[1], url, (("content", b"no"),)))
                    sent = daemon.call(ALICE, "PUT", url, content=b"hello")
                    assert sent.status_code == 200, sent.text
                elif kind is records.Kind.STDOUT and isinstance(msg, bytes):
                    out += msg
    assert out == b"hello"


# -- owners, listings, root, guest operations, reload ----------------------------------------


def test_a_listing_shows_only_what_the_caller_may_see(daemon: Daemon) -> None:
    def ids(who: str) -> list[str]:
        r = daemon.call(who, "GET", "/v1/sandboxes", params={"all": "true"})
        assert r.status_code == 200, r.text
        return [vm["id"] for vm in r.json()]

    assert ids(ALICE) == [daemon.vm] and ids(VERA) == [daemon.vm] and ids(ADMIN) == [daemon.vm]
    assert ids(MALLORY) == [] and ids(NOBODY) == []

    def event_vms(who: str) -> set[str]:
        r = daemon.call(who, "GET", "/v1/events")
        assert r.status_code == 200, r.text
        return {e["vm_id"] for e in r.json()}

    assert event_vms(ALICE) == {daemon.vm} and event_vms(MALLORY) == set()
    r = daemon.call(MALLORY, "GET", "/v1/events", params={"vm": daemon.vm})
    assert r.status_code == 200 and r.json() == []


def test_links_need_link_on_both_sandboxes(daemon: Daemon) -> None:
    """Who may not see alice's sandbox gets 404, who may see it but not link it 403 (and the
    denial is audited); alice passes the policy and reaches the link's own checks (a link of
    a sandbox to itself is refused, 409). Listings show only links the caller may link."""
    from warden import audit

    body = {"a": daemon.vm, "b": daemon.vm, "name": "l"}
    for who in (MALLORY, NOBODY):
        r = daemon.call(who, "POST", "/v1/links", json=body)
        assert r.status_code == 404 and f"no VM has id or name '{daemon.vm}'" in r.text, r.text
    r = daemon.call(VERA, "POST", "/v1/links", json=body)
    assert r.status_code == 403 and "vera may not link" in r.text, r.text
    for who in (ALICE, ADMIN):
        r = daemon.call(who, "POST", "/v1/links", json=body)
        assert r.status_code == 409 and r.json()["error"]["type"] == "LinkError", r.text
    r = daemon.call(ALICE, "POST", "/v1/links", json={**body, "b": "no-such-vm"})
    assert r.status_code == 404, r.text
    for who in (ALICE, MALLORY, ADMIN):
        r = daemon.call(who, "GET", "/v1/links")
        assert r.status_code == 200 and r.json() == [], r.text
        r = daemon.call(who, "DELETE", "/v1/links/none")
        assert r.status_code == 404 and r.json()["error"]["type"] == "LinkNotFoundError"
    denied = [
        r
        for r in audit.records(daemon.paths.home, action="link")
        if r["outcome"] == "denied" and r.get("principal") == "vera"
    ]
    assert denied and denied[-1]["sandbox"] == daemon.vm


def test_root_in_the_guest_needs_exec_as_root(daemon: Daemon) -> None:
    url = f"{SB}/exec"
    root = {"cmd": ["id", "-u"], "user": "root"}
    r = daemon.call(ALICE, "POST", url, json=root)
    assert r.status_code == 403 and "alice may not exec-as-root" in r.text, r.text
    assert _stdout(daemon.call(ROOTER, "POST", url, json=root)) == b"0\n"
    assert _stdout(daemon.call(ADMIN, "POST", url, json=root)) == b"0\n"
    assert _stdout(daemon.call(ALICE, "POST", url, json={"cmd": ["id", "-u"]})) == b"1000\n"
    as_root = {"path": "/etc/hostname", "user": "root"}
    r = daemon.call(ALICE, "GET", f"{SB}/files", params=as_root)
    assert r.status_code == 403 and "exec-as-root" in r.text, r.text
    assert daemon.call(ROOTER, "GET", f"{SB}/files", params=as_root).status_code == 200


def test_a_sandbox_policy_refuses_a_guest_operation_to_everyone(daemon: Daemon) -> None:
    write = {"params": {"path": "/home/user/g"}, "content": b"g"}
    try:
        assert daemon.reload(daemon.base_policy + GUEST_READ_ONLY).status_code == 200
        for who in (ALICE, ADMIN):
            r = daemon.call(who, "PUT", f"{SB}/files", **write)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["type"] == "GuestOperationRefusedError"
            assert "team-a-is-read-only" in r.text and "whoever asks" in r.text
        assert (
            daemon.call(ALICE, "GET", f"{SB}/files/list", params={"path": "/"}).status_code == 200
        )
        # A bad file is refused, saying where, and the policy in force stays.
        r = daemon.reload(daemon.base_policy + "\n[[guest]]\nname = 'x'\nblock = [\n")
        assert r.status_code == 409 and r.json()["error"]["type"] == "PolicyError", r.text
        assert "line" in r.text
        assert daemon.call(ALICE, "PUT", f"{SB}/files", **write).status_code == 403
    finally:
        assert daemon.reload(daemon.base_policy).status_code == 200
    assert daemon.call(ALICE, "PUT", f"{SB}/files", **write).status_code == 200


def test_a_reload_changes_decisions_without_a_restart(daemon: Daemon) -> None:
    assert daemon.call(MALLORY, "GET", SB).status_code == 404
    try:
        viewers = 'vera = ["viewer"]\nmallory = ["viewer"]'
        r = daemon.reload(daemon.base_policy.replace('vera = ["viewer"]', viewers))
        assert r.status_code == 200, r.text
        assert daemon.call(MALLORY, "GET", SB).status_code == 200
        assert daemon.call(MALLORY, "POST", f"{SB}/stop").status_code == 403
    finally:
        assert daemon.reload(daemon.base_policy).status_code == 200
    assert daemon.call(MALLORY, "GET", SB).status_code == 404


def test_warden_policy_reload(daemon: Daemon) -> None:
    def reload() -> subprocess.CompletedProcess[str]:
        argv = [WARDEN, "policy", "reload", "--host", f"unix://{daemon.socket}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    p = reload()
    assert p.returncode == 0 and str(policy_path(daemon.paths)) in p.stdout, p.stderr
    try:
        policy_path(daemon.paths).write_text(daemon.base_policy + "\n[[rules]]\nname = 3\n")
        p = reload()
        said = " ".join(p.stderr.split())  # rich wraps lines
        assert p.returncode == 125 and '[[rules]] #6 has no name: add name = "' in said, said
        assert "HTTP 409" in said
    finally:
        assert daemon.reload(daemon.base_policy).status_code == 200


# -- the routes that change or end the sandbox, last -----------------------------------------


def test_lifecycle_routes(daemon: Daemon) -> None:
    for call in LIFECYCLE:
        _denied(daemon, call)
    template, fork, pause, resume, stop, rm = LIFECYCLE
    r = daemon.call(ALICE, template.method, template.path, **template.kwargs)
    assert r.status_code == 201, r.text
    r = daemon.call(ALICE, "DELETE", "/v1/templates/pol-t")
    assert r.status_code == 403 and "alice may not admin the daemon" in r.text
    assert daemon.call(ADMIN, "DELETE", "/v1/templates/pol-t").status_code == 204

    r = daemon.call(ALICE, fork.method, fork.path, **fork.kwargs)
    assert r.status_code == 201, r.text
    child = r.json()[0]
    assert child["owner"] == "alice"
    assert daemon.call(MALLORY, "GET", f"/v1/sandboxes/{child['id']}").status_code == 404
    for call in (stop, rm):
        url = call.path.replace("{ref}", child["id"])
        r = daemon.call(ALICE, call.method, url, **call.kwargs)
        assert r.status_code == call.ok, r.text

    for call in (pause, resume, stop, rm):
        r = daemon.call(ALICE, call.method, call.path, **call.kwargs)
        assert r.status_code == call.ok, (call, r.text)
    assert daemon.call(ADMIN, "GET", "/v1/sandboxes", params={"all": "true"}).json() == []
