"""Who may do what: the deny-by-default access policy (``$WARDEN_HOME/policy.toml``).

The policy maps **roles** to **actions** on sandboxes, selected by the sandbox's **owner**,
**labels** and **template**, and says which **guest operations** each sandbox accepts. It is a
TOML file read with the stdlib ``tomllib``; without one, the shipped default
(``policy/default.toml``) applies. Like polkit's rules or an AWS IAM policy, the decision is
deny by default (no rule allows: denied) and an explicit deny wins over any allow::

    policy = load_policy(paths)                     # PolicyError names the key and the fix
    d = policy.decide(principal, "exec", Target.of_sandbox(owner="alice", labels={}))
    d.allowed, d.rule   # False, 'no rule of policy.toml allows exec on ...'

A rule (``[[rules]]``, every key but ``name`` and ``actions`` optional)::

    [[rules]]
    name = "own-sandboxes"          # required, unique: decisions and the audit log name it
    effect = "allow"                # or "deny" (a matching deny wins)
    roles = ["user"]                # the principal has one of them ("*": any principal)
    actions = ["exec", "files-read"]  # ACTIONS, or "*"
    on = ["sandboxes"]              # what it covers: "sandboxes" (default) and/or "daemon"
    owner = "self"                  # sandboxes: "self" | "any" (default) | a principal's name
    labels = { team = "ci" }        # sandboxes: every one given must match
    templates = ["py"]              # sandboxes: made from (or, for a create, of) one of these

``on = ["daemon"]`` rules cover what is not about one sandbox (the template list, ``info``,
``/metrics``, every sandbox's events, a policy reload, removing a template); they take no
owner, labels or templates. ``[principals]`` adds roles to principals by name
(``alice = ["user"]``), beside the roles the principal came with (token, unix group).

Guest operations (``[[guest]]``) restrict what a sandbox's agent is asked to do, whoever asks,
like qemu-guest-agent's ``--allow-rpcs``/``--block-rpcs`` but enforced on the host::

    [[guest]]
    name = "read-only-ci"
    labels = { team = "ci" }        # owner, labels, templates select sandboxes as above
    block = ["files-write"]         # refused for these sandboxes
    # allow = ["exec", "info"]      # or: only these (every matching allow list must list it)

Without guest rules every operation is accepted.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from warden._errors import PolicyError
from warden.auth.principal import Principal
from warden.config import Paths

if TYPE_CHECKING:
    from warden.store.db import VMRow

POLICY_FILE = "policy.toml"
SHIPPED = "the shipped default policy (warden/policy/default.toml)"

ACTIONS: tuple[str, ...] = (
    "create",
    "exec",
    "exec-as-root",
    "files-read",
    "files-write",
    "stop",
    "rm",
    "pause",
    "fork",
    "template",
    "link",
    "admin",
    "inspect",
)
"""Every action a rule can name. ``inspect`` covers list, inspect, logs, guest info, ping
and events; ``pause`` covers resume; ``admin`` covers daemon-wide changes."""

GUEST_OPS: tuple[str, ...] = ("exec", "files-read", "files-write", "info")
"""The guest-agent operations a ``[[guest]]`` rule can allow or block."""

Scope = Literal["sandboxes", "daemon"]
SCOPES: tuple[Scope, ...] = ("sandboxes", "daemon")
ANY = "*"


def policy_path(paths: Paths) -> Path:
    """Where the host's policy lives: ``$WARDEN_HOME/policy.toml``."""
    return paths.home / POLICY_FILE


@dataclass(frozen=True)
class Target:
    """What a decision is about: one sandbox (its owner, labels and template; for a create,
    those it would have) or, with ``sandbox=False``, the daemon itself."""

    sandbox: bool = True
    owner: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    template: str | None = None
    id: str | None = None

    @classmethod
    def daemon(cls) -> Target:
        return cls(sandbox=False)

    def describe(self) -> str:
        if not self.sandbox:
            return "the daemon"
        what = f"sandbox {self.id}" if self.id else "a new sandbox"
        return f"{what} (owner {self.owner or '-'})"


def target_of(row: VMRow) -> Target:
    """What the policy selects a stored sandbox by: its owner, labels and template."""
    return Target(owner=row.owner, labels=row.labels, template=row.template, id=row.id)


@dataclass(frozen=True)
class Decision:
    """An answer: ``allowed``, and ``rule`` naming the rule (file, name, index, roles) that
    made it, or saying that no rule allows it."""

    allowed: bool
    rule: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class Selector:
    """Which sandboxes a rule covers: owner (``self``/``any``/a name), labels, templates."""

    owner: str = "any"
    labels: Mapping[str, str] = field(default_factory=dict)
    templates: frozenset[str] | None = None

    @property
    def narrowed(self) -> bool:
        return self.owner != "any" or bool(self.labels) or self.templates is not None

    def matches(self, target: Target, principal: Principal | None) -> bool:
        if self.owner == "self":
            if principal is None or target.owner != principal.name:
                return False
        elif self.owner not in ("any", target.owner):
            return False
        if any(target.labels.get(k) != v for k, v in self.labels.items()):
            return False
        return self.templates is None or target.template in self.templates


@dataclass(frozen=True)
class Rule:
    name: str
    index: int
    effect: Literal["allow", "deny"]
    roles: frozenset[str]
    actions: frozenset[str]
    on: frozenset[Scope]
    select: Selector

    def covers(self, roles: frozenset[str], action: str, target: Target) -> bool:
        if ANY not in self.roles and not (self.roles & roles):
            return False
        if ANY not in self.actions and action not in self.actions:
            return False
        return ("sandboxes" if target.sandbox else "daemon") in self.on


@dataclass(frozen=True)
class GuestRule:
    name: str
    index: int
    select: Selector
    allow: frozenset[str] | None
    block: frozenset[str]


@dataclass(frozen=True)
class Policy:
    """A parsed, validated policy. ``source`` names where it came from, in every decision."""

    source: str
    rules: tuple[Rule, ...]
    guest: tuple[GuestRule, ...] = ()
    principals: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def roles_of(self, principal: Principal) -> frozenset[str]:
        """The principal's own roles plus those ``[principals]`` gives its name."""
        return principal.roles | self.principals.get(principal.name, frozenset())

    def decide(self, principal: Principal, action: str, target: Target) -> Decision:
        """May ``principal`` do ``action`` on ``target``? A matching deny rule wins; else the
        first matching allow rule; else denied ("no rule allows"). An unknown action is
        denied."""
        if action not in ACTIONS:
            return Decision(False, f"{action!r} is not an action (known: {', '.join(ACTIONS)})")
        roles = self.roles_of(principal)
        allowed: Rule | None = None
        for rule in self.rules:
            if not rule.covers(roles, action, target):
                continue
            if not rule.select.matches(target, principal):
                continue
            if rule.effect == "deny":
                return Decision(False, self._name(rule, roles))
            allowed = allowed or rule
        if allowed is not None:
            return Decision(True, self._name(allowed, roles))
        who = ", ".join(sorted(roles)) or "none"
        return Decision(
            False,
            f"no rule of {self.source} allows {action} on {target.describe()} "
            f"to {principal.name} (roles: {who})",
        )

    def guest_allows(self, op: str, target: Target) -> Decision:
        """Does the sandbox ``target`` accept the guest operation ``op``, whoever asks?"""
        if op not in GUEST_OPS:
            return Decision(False, f"{op!r} is not a guest operation ({', '.join(GUEST_OPS)})")
        for rule in self.guest:
            if not rule.select.matches(target, Principal(target.owner or "")):
                continue
            if op in rule.block or (rule.allow is not None and op not in rule.allow):
                return Decision(False, f'{self.source}, [[guest]] #{rule.index} "{rule.name}"')
        return Decision(True, f"{self.source}: no [[guest]] rule refuses {op}")

    def _name(self, rule: Rule, roles: frozenset[str]) -> str:
        matched = sorted(rule.roles & roles) if ANY not in rule.roles else [ANY]
        return (
            f'{self.source}, [[rules]] #{rule.index} "{rule.name}" '
            f"({rule.effect}, role {', '.join(matched)})"
        )


# -- loading -----------------------------------------------------------------------------


def load_policy(paths: Paths) -> Policy:
    """The policy of ``$WARDEN_HOME/policy.toml``, or the shipped default if there is none.
    PolicyError says which line or key is wrong and what to write instead, or that the file
    is not the daemon's own (a symlink, another owner, writable by group or others: whoever
    can write it can make themselves admin)."""
    path = policy_path(paths)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return shipped_policy()
    except OSError as exc:
        raise PolicyError(f"cannot read the policy {path} (a symlink is refused): {exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PolicyError(
                f"the policy {path} must belong to the daemon's user and be writable by it "
                f"only (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): "
                f"chown {os.geteuid()} and chmod go-w it"
            )
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"the policy {path} is not UTF-8: {exc}") from None
    return parse_policy(text, str(path))


def shipped_policy() -> Policy:
    text = resources.files("warden.policy").joinpath("default.toml").read_text("utf-8")
    return parse_policy(text, SHIPPED)


def parse_policy(text: str, source: str) -> Policy:
    """Parse and validate a policy's TOML; PolicyError names the line or key at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source} is not valid TOML: {exc}; fix that line") from None
    _only(data, {"version", "principals", "rules", "guest"}, source, "")
    version = data.get("version", 1)
    if version != 1:
        raise PolicyError(f"{source}: version = {version!r}: this warden reads version = 1")
    rules = tuple(
        _rule(raw, i, source) for i, raw in enumerate(_tables(data, "rules", source), start=1)
    )
    guest = tuple(
        _guest(raw, i, source) for i, raw in enumerate(_tables(data, "guest", source), start=1)
    )
    _unique([r.name for r in rules], "rules", source)
    _unique([g.name for g in guest], "guest", source)
    return Policy(source, rules, guest, _principals(data.get("principals", {}), source))


def _tables(data: Mapping[str, Any], key: str, source: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError(f"{source}: {key!r} must be tables: write [[{key}]] blocks")
    return value


def _only(table: Mapping[str, Any], keys: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise PolicyError(
            f"{source}: {where}unknown key {unknown[0]!r}; the keys are {', '.join(sorted(keys))}"
        )


def _unique(names: list[str], key: str, source: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PolicyError(f"{source}: two [[{key}]] are named {name!r}; rename one")
        seen.add(name)


def _strings(value: object, where: str, allowed: Iterable[str] | None = None) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PolicyError(f'{where} must be a non-empty list of strings, e.g. ["a", "b"]')
    if allowed is not None:
        known = set(allowed)
        for v in value:
            if v not in known and v != ANY:
                raise PolicyError(
                    f'{where}: {v!r} is unknown; write one of {", ".join(sorted(known))} or "*"'
                )
    return frozenset(value)


def _name_of(raw: Mapping[str, Any], key: str, index: int, source: str) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f'{source}: [[{key}]] #{index} has no name: add name = "what-it-is-for"')
    return name


def _selector(raw: Mapping[str, Any], where: str) -> Selector:
    owner = raw.get("owner", "any")
    if not isinstance(owner, str) or not owner:
        raise PolicyError(f'{where}.owner must be "self", "any" or a principal\'s name')
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise PolicyError(f'{where}.labels must be a table of strings, e.g. {{ team = "ci" }}')
    templates = raw.get("templates")
    chosen = None if templates is None else _strings(templates, f"{where}.templates")
    return Selector(owner, dict(labels), chosen)


def _rule(raw: Mapping[str, Any], index: int, source: str) -> Rule:
    name = _name_of(raw, "rules", index, source)
    where = f'{source}: [[rules]] #{index} "{name}"'
    keys = {"name", "effect", "roles", "actions", "on", "owner", "labels", "templates"}
    _only(raw, keys, source, f'[[rules]] #{index} "{name}": ')
    effect = raw.get("effect", "allow")
    if effect not in ("allow", "deny"):
        raise PolicyError(f'{where}.effect must be "allow" or "deny", not {effect!r}')
    if "roles" not in raw:
        raise PolicyError(f'{where} has no roles: add roles = ["user"] (or ["*"] for anyone)')
    if "actions" not in raw:
        raise PolicyError(f'{where} has no actions: add actions = ["exec", ...] (or ["*"])')
    on = _strings(raw.get("on", ["sandboxes"]), f"{where}.on", SCOPES)
    on_scopes = frozenset(SCOPES) if ANY in on else on
    select = _selector(raw, where)
    if select.narrowed and "daemon" in on_scopes:
        raise PolicyError(
            f"{where}: owner, labels and templates select sandboxes; a rule with "
            'on = ["daemon"] cannot have them: split it in two rules'
        )
    return Rule(
        name=name,
        index=index,
        effect=effect,
        roles=_strings(raw["roles"], f"{where}.roles"),
        actions=_strings(raw["actions"], f"{where}.actions", ACTIONS),
        on=frozenset(s for s in SCOPES if s in on_scopes),
        select=select,
    )


def _guest(raw: Mapping[str, Any], index: int, source: str) -> GuestRule:
    name = _name_of(raw, "guest", index, source)
    where = f'{source}: [[guest]] #{index} "{name}"'
    keys = {"name", "owner", "labels", "templates", "allow", "block"}
    _only(raw, keys, source, f'[[guest]] #{index} "{name}": ')
    if "allow" not in raw and "block" not in raw:
        raise PolicyError(f'{where} has neither allow nor block: add block = ["files-write"]')
    allow = raw.get("allow")
    allowed = None if allow is None else _strings(allow, f"{where}.allow", GUEST_OPS)
    if allowed is not None and ANY in allowed:
        allowed = frozenset(GUEST_OPS)
    blocked = _strings(raw["block"], f"{where}.block", GUEST_OPS) if "block" in raw else frozenset()
    if ANY in blocked:
        blocked = frozenset(GUEST_OPS)
    return GuestRule(name, index, _selector(raw, where), allowed, blocked)


def _principals(raw: object, source: str) -> dict[str, frozenset[str]]:
    if not isinstance(raw, dict):
        raise PolicyError(f'{source}: [principals] must be a table: alice = ["user"]')
    return {
        str(name): _strings(roles, f"{source}: principals.{name}") for name, roles in raw.items()
    }
