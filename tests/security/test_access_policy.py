"""The access policy without VMs: parsing and validation of policy.toml, the decisions of the
shipped default and of hand-written rules, the route table's completeness, and the owner
column's migration. The real daemon's enforcement is in test_access_matrix.py."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.integration.conftest import WARDEN
from warden._errors import PermissionDeniedError, PolicyError, VMNotFoundError
from warden.auth.principal import LOCAL_ADMIN, SCOPE_KEY, Principal
from warden.config import Paths
from warden.links import LinkManager
from warden.policy.access import (
    ACTIONS,
    GUEST_OPS,
    Target,
    load_policy,
    parse_policy,
    policy_path,
    shipped_policy,
)
from warden.server.access import ROUTES, AccessControl, Denial
from warden.server.app import create_app
from warden.server.audit import Auditor
from warden.server.manager import Manager
from warden.store.db import MIGRATIONS, EventRow, Store, VMRow
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

ALICE = Principal("alice", frozenset({"user"}), via="unix", uid=1000)
BOB = Principal("bob", frozenset({"user"}), via="unix", uid=1001)
NOBODY = Principal("nobody")
ALICES = Target(owner="alice", labels={"team": "ci"}, template="py", id="a1")
BOBS = Target(owner="bob", labels={}, id="b1")

RULES = """
[principals]
carol = ["ci"]

[[rules]]
name = "ci-runs-ci-boxes"
roles = ["ci"]
actions = ["exec", "inspect"]
labels = { team = "ci" }

[[rules]]
name = "py-only"
roles = ["py"]
actions = ["create"]
templates = ["py"]

[[rules]]
name = "bob-helps-alice"
roles = ["user"]
actions = ["inspect"]
owner = "alice"

[[rules]]
name = "no-one-removes-ci"
effect = "deny"
roles = ["*"]
actions = ["rm"]
labels = { team = "ci" }

[[rules]]
name = "admins"
roles = ["admin"]
actions = ["*"]
on = ["sandboxes", "daemon"]
"""


def test_the_shipped_default_lets_users_act_on_their_own_sandboxes_only() -> None:
    policy = shipped_policy()
    mine = [a for a in ACTIONS if a not in ("exec-as-root", "admin")]
    for action in mine:
        assert policy.decide(ALICE, action, ALICES).allowed, action
        denied = policy.decide(BOB, action, ALICES)
        assert not denied.allowed and denied.rule.startswith("no rule"), action
    for action in ("exec-as-root", "admin"):
        assert not policy.decide(ALICE, action, ALICES).allowed
    assert not policy.decide(ALICE, "admin", Target.daemon()).allowed
    assert policy.decide(ALICE, "inspect", Target.daemon()).allowed  # the template list
    for action in ACTIONS:
        assert policy.decide(LOCAL_ADMIN, action, BOBS).allowed
        assert not policy.decide(NOBODY, action, BOBS).allowed


def test_a_decision_names_the_rule_and_a_denial_says_no_rule_allows() -> None:
    policy = shipped_policy()
    d = policy.decide(ALICE, "exec", ALICES)
    assert d and '[[rules]] #2 "users-own-sandboxes"' in d.rule and "role user" in d.rule
    d = policy.decide(ALICE, "exec-as-root", ALICES)
    assert not d and "no rule" in d.rule and "exec-as-root" in d.rule and "alice" in d.rule


def test_unknown_actions_and_principals_are_denied() -> None:
    policy = shipped_policy()
    d = policy.decide(LOCAL_ADMIN, "launch-missiles", ALICES)
    assert not d and "not an action" in d.rule
    assert not policy.decide(Principal("stranger", frozenset({"guest"})), "inspect", ALICES)


def test_labels_templates_owner_names_principals_and_deny_wins() -> None:
    policy = parse_policy(RULES, "test.toml")
    carol = Principal("carol")  # roles from [principals]
    assert policy.decide(carol, "exec", ALICES)
    assert not policy.decide(carol, "exec", BOBS)  # no team=ci label
    assert not policy.decide(carol, "files-read", ALICES)
    py = Principal("pat", frozenset({"py"}))
    assert policy.decide(py, "create", Target(owner="pat", template="py"))
    assert not policy.decide(py, "create", Target(owner="pat", template=None))
    assert policy.decide(BOB, "inspect", ALICES)  # owner = "alice"
    assert not policy.decide(BOB, "inspect", BOBS)
    denied = policy.decide(LOCAL_ADMIN, "rm", ALICES)
    assert not denied and '"no-one-removes-ci" (deny' in denied.rule
    assert policy.decide(LOCAL_ADMIN, "rm", BOBS)


def test_guest_rules_block_or_allow_list_operations() -> None:
    policy = parse_policy(
        """
        [[guest]]
        name = "ci-read-only"
        labels = { team = "ci" }
        block = ["files-write"]

        [[guest]]
        name = "py-exec-only"
        templates = ["py"]
        allow = ["exec", "files-write", "files-read"]
        """,
        "g.toml",
    )
    refused = policy.guest_allows("files-write", ALICES)
    assert not refused and "ci-read-only" in refused.rule
    assert policy.guest_allows("exec", ALICES)
    assert not policy.guest_allows("info", ALICES)  # not in py-exec-only's allow list
    assert all(policy.guest_allows(op, BOBS) for op in ("exec", "files-write", "info"))
    assert all(shipped_policy().guest_allows(op, ALICES) for op in ("exec", "files-write"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[rules]]\nname = "x"\nroles = ["user"\nactions = ["exec"]\n', "line 4"),
        ('[[rules]]\nname = "x"\nroles = ["user"]\nactions = ["exe"]\n', "'exe' is unknown"),
        ('[[rules]]\nroles = ["user"]\nactions = ["exec"]\n', "has no name"),
        ('[[rules]]\nname = "x"\nactions = ["exec"]\n', "has no roles"),
        ('[[rules]]\nname = "x"\nroles = ["u"]\nactions = ["exec"]\nowners = "self"\n', "owners"),
        ('[[rules]]\nname = "x"\nroles = ["u"]\nactions = ["exec"]\neffect = "maybe"\n', "deny"),
        ('[[rules]]\nname = "x"\nroles = ["u"]\nactions = ["admin"]\non = ["daemon"]\n'
         'owner = "self"\n', "split it"),
        ('[[rules]]\nname = "x"\nroles = []\nactions = ["exec"]\n', "non-empty"),
        ('[[rules]]\nname = "x"\nroles = ["u"]\nactions = ["exec"]\n' * 2, "two [[rules]]"),
        ('[[guest]]\nname = "g"\nblock = ["reboot"]\n', "'reboot' is unknown"),
        ('[[guest]]\nname = "g"\n', "neither allow nor block"),
        ("version = 2\n", "version = 1"),
        ("rules = 3\n", "[[rules]] blocks"),
        ('[principals]\nalice = "user"\n', "principals.alice"),
        ("colour = 1\n", "unknown key 'colour'"),
    ],
)  # fmt: skip
def test_a_bad_policy_is_refused_naming_the_line_or_key(text: str, says: str) -> None:
    with pytest.raises(PolicyError, match=r"bad\.toml") as refused:
        parse_policy(text, "bad.toml")
    assert says in str(refused.value), str(refused.value)


def test_the_file_in_warden_home_replaces_the_shipped_default(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert load_policy(paths).source == shipped_policy().source
    policy_path(paths).write_text(RULES)
    assert load_policy(paths).source == str(policy_path(paths))
    policy_path(paths).write_text("[[rules]\n")
    with pytest.raises(PolicyError, match="line 1"):
        load_policy(paths)


def test_a_policy_file_others_may_write_is_refused(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    policy_path(paths).write_text(RULES)
    policy_path(paths).chmod(0o666)
    with pytest.raises(PolicyError, match="chmod go-w"):
        load_policy(paths)
    policy_path(paths).unlink()
    (tmp_path / "elsewhere.toml").write_text(RULES)
    policy_path(paths).symlink_to(tmp_path / "elsewhere.toml")
    with pytest.raises(PolicyError, match="symlink"):
        load_policy(paths)


def test_a_reload_keeps_the_old_policy_when_the_new_file_is_bad(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    control = AccessControl.load(paths)
    assert not control.may(BOB, "inspect", ALICES)
    policy_path(paths).write_text(RULES)
    control.reload()
    assert control.may(BOB, "inspect", ALICES)
    policy_path(paths).write_text('[[rules]]\nname = "x"\n')
    with pytest.raises(PolicyError, match="has no roles"):
        control.reload()
    assert control.may(BOB, "inspect", ALICES)  # the old one stays


async def test_every_denial_goes_through_the_hook(tmp_path: Path) -> None:
    control = AccessControl.load(Paths(tmp_path))
    seen: list[Denial] = []

    async def hook(denial: Denial) -> None:
        seen.append(denial)

    control.on_denied = hook
    with pytest.raises(PermissionDeniedError, match="alice may not exec-as-root") as denied:
        await control.require(ALICE, "exec-as-root", ALICES)
    assert "no rule" in str(denied.value)
    assert [(d.principal, d.action, d.target) for d in seen] == [(ALICE, "exec-as-root", ALICES)]


def test_the_deprecated_allow_root_grants_exec_as_root_but_not_past_a_deny(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert not AccessControl.load(paths).may(ALICE, "exec-as-root", ALICES)
    assert AccessControl.load(paths, root_for_all=True).may(ALICE, "exec-as-root", ALICES)
    policy_path(paths).write_text(
        '[[rules]]\nname = "never-root"\neffect = "deny"\nroles = ["*"]\n'
        'actions = ["exec-as-root"]\n'
    )
    assert not AccessControl.load(paths, root_for_all=True).may(ALICE, "exec-as-root", ALICES)


class _FakeManager:
    """Only what authorize and the filtered listings read: one stored sandbox, alice's. Any
    other use (a route that went past the gate) fails the test. A fake because this checks
    the gate in front of every route, which needs no VM (test_access_matrix.py has them)."""

    def __init__(self) -> None:
        self.paths = Paths(Path("/nonexistent"))
        self.row = VMRow(
            id="a1", name="box", state=VMState.RUNNING, spec_json=VMSpec().model_dump_json(),
            image="default", vcpus=1, memory_mib=256, labels={}, created_at=0.0,
            started_at=None, stopped_at=None, qemu_pid=None, qemu_start=None,
            runtime_dir=None, exit_code=None, error=None, owner="alice",
        )  # fmt: skip
        self.store = self
        self.audit = Auditor()  # records nothing: the matrix test reads a real log
        self.links = LinkManager(self)  # none: a removal past the gate finds nothing

    async def machine(self, ref: str) -> Machine:
        raise AssertionError(f"a route went past the gate to sandbox {ref}'s machine")

    async def get(self, ref: str) -> VMRow:
        if ref in ("a1", "box"):
            return self.row
        raise VMNotFoundError(f"no VM has id or name {ref!r}; `warden ps --all` lists them")

    def events_since(self, after: int, *, vm_id: str | None, limit: int) -> list[EventRow]:
        return [EventRow(1, "a1", 0.0, "created", {})]

    async def list(self, *, all: bool = False) -> list[VMRow]:
        return [self.row]


def _as(app: FastAPI, principal: Principal) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, SCOPE_KEY: principal}
        await app(scope, receive, send)

    return middleware


def _route_keys(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app serves but FastAPI's own docs pages."""
    from fastapi import routing

    iterate = getattr(routing, "iter_route_contexts", None)  # FastAPI >= 0.16x: included
    routes = list(iterate(app.routes)) if iterate is not None else list(app.routes)
    own = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    return {
        (method, str(getattr(r, "path", "")))
        for r in routes
        if getattr(r, "path", "") not in own
        for method in (getattr(r, "methods", None) or ())
        if method != "HEAD"
    }


def _gated_app() -> FastAPI:
    control = AccessControl(Paths(Path("/nonexistent")), shipped_policy())
    return create_app(cast(Manager, _FakeManager()), manage_lifespan=False, access=control)


def test_every_api_route_declares_its_action() -> None:
    """A new endpoint cannot be forgotten: the test fails until it is in ROUTES."""
    served = _route_keys(_gated_app())
    assert served - set(ROUTES) == set(), "routes without an action in server/access.ROUTES"
    assert set(ROUTES) - served == set(), "ROUTES names routes that do not exist"
    assert {r.action for r in ROUTES.values() if r.kind != "open"} <= set(ACTIONS)
    assert [k for k, r in ROUTES.items() if r.kind == "open"] == [("GET", "/v1/whoami")]
    assert {r.guest for r in ROUTES.values()} <= {None, *GUEST_OPS}


@pytest.mark.parametrize("who", [NOBODY, BOB], ids=lambda p: p.name)
async def test_every_route_is_behind_the_gate(who: Principal) -> None:
    """Whoever may not see alice's sandbox gets 404 for it on every sandbox route, 403 on
    every daemon route and create, and listings without it; no route reaches the manager."""
    app = _gated_app()
    transport = httpx.ASGITransport(app=_as(app, who))
    async with httpx.AsyncClient(transport=transport, base_url="http://warden") as http:
        for (method, path), needs in ROUTES.items():
            if who is BOB and needs.kind in ("daemon", "create") and needs.action != "admin":
                continue  # users may list templates and create: past the gate, by design
            url = path.replace("{ref}", "a1").replace("{exec_id}", "e").replace("{name}", "t")
            body: dict[str, object] = {"cmd": ["true"]} if url.endswith("/exec") else {}
            if url == "/v1/links":
                body = {"a": "a1", "b": "a1", "name": "t"}
            r = await http.request(method, url, params={"path": "/tmp/x"}, json=body)
            if needs.kind == "link":  # alice's sandbox concealed; no link named t to remove
                assert r.status_code == 404, (url, r.text)
                assert "'a1'" in r.text or "no link is named 't'" in r.text, (url, r.text)
            elif needs.kind == "sandbox":
                assert r.status_code == 404 and "no VM has id or name 'a1'" in r.text, (url, r.text)
            elif needs.kind == "filtered":
                assert r.status_code == 200 and r.json() == [], (url, r.text)
            elif needs.kind == "open":
                assert r.status_code == 200 and r.json()["name"] == who.name, (url, r.text)
            else:
                assert r.status_code == 403, (url, r.text)
                assert r.json()["error"]["type"] == "PermissionDeniedError"
                assert f"may not {needs.action}" in r.text


def test_owners_are_recorded_and_old_databases_belong_to_root(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO vms (id, name, state, spec_json, image, vcpus, memory_mib, labels_json,"
        " created_at) VALUES ('old', NULL, 'stopped', ?, 'default', 1, 256, '{}', 0)",
        (VMSpec().model_dump_json(),),
    )
    conn.commit()
    conn.close()
    with Store(db) as store:
        assert store.get_vm("old") is not None and store.get_vm("old").owner == "root"  # type: ignore[union-attr]
        assert store.create_vm("new", VMSpec(template="py"), owner="alice").owner == "alice"
        row = store.get_vm("new")
        assert row is not None and row.owner == "alice" and row.template == "py"


def test_a_pool_member_is_the_daemons_until_taken(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        assert store.create_vm("m1", VMSpec(template="py")).owner == "root"
        row = store.hand_over("m1", VMSpec(template="py", name="mine"), owner="alice")
        assert row.owner == "alice"
        assert store.events_since(0, vm_id="m1")[-1].detail == {"name": "mine", "owner": "alice"}


def _check(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WARDEN, "policy", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"WARDEN_HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("text", "name", "roles"),
    [
        ("alice", "alice", set()),
        ("alice:user", "alice", {"user"}),
        ("alice:user,ci", "alice", {"user", "ci"}),
        ("uid:1001", "uid:1001", set()),
        ("uid:1001:user", "uid:1001", {"user"}),
    ],
)
def test_policy_check_reads_principals(text: str, name: str, roles: set[str]) -> None:
    from warden.cli.policy import parse_principal

    assert parse_principal(text) == (name, frozenset(roles))


def test_policy_check_prints_the_decision_and_the_rule(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        store.create_vm("vm1", VMSpec(name="box", labels={"team": "ci"}), owner="alice")
    p = _check(tmp_path, "alice:user", "exec", "box")
    assert p.returncode == 0 and p.stdout.startswith("allow\t"), p.stdout + p.stderr
    assert '"users-own-sandboxes"' in p.stdout and "guest accepts" in p.stdout
    p = _check(tmp_path, "bob:user", "exec", "vm1")
    assert p.returncode == 1 and p.stdout.startswith("deny\t") and "no rule" in p.stdout
    p = _check(tmp_path, "alice:user", "admin")
    assert p.returncode == 1 and "the daemon" in p.stdout
    policy_path(Paths(tmp_path)).write_text(RULES)
    p = _check(tmp_path, "carol", "exec", "box")  # roles from [principals]
    assert p.returncode == 0 and '"ci-runs-ci-boxes"' in p.stdout, p.stdout
    p = _check(tmp_path, "alice:user", "exec", "nope")
    assert p.returncode == 125 and "nope" in p.stderr
    policy_path(Paths(tmp_path)).write_text("[[rules]\n")
    p = _check(tmp_path, "alice:user", "exec", "box")
    assert p.returncode == 125 and "line 1" in p.stderr, p.stderr


def test_policy_default_prints_the_shipped_policy(tmp_path: Path) -> None:
    p = subprocess.run(
        [WARDEN, "policy", "default"], capture_output=True, text=True, timeout=60, check=True
    )
    assert parse_policy(p.stdout, "printed").rules == shipped_policy().rules


def test_a_bad_policy_refuses_the_daemon_start(tmp_path: Path) -> None:
    policy_path(Paths(tmp_path)).write_text('[[rules]]\nname = "x"\nroles = ["user"]\n')
    p = subprocess.run(
        [WARDEN, "serve", "--socket", str(tmp_path / "w.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"WARDEN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 1, p.stderr
    assert '[[rules]] #1 "x" has no actions' in p.stderr and "add actions" in p.stderr
    assert not (tmp_path / "w.sock").exists()
