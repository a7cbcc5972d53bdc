"""``warden policy check|reload``: the access policy (``$WARDEN_HOME/policy.toml``).

``check`` answers offline, from this host's policy file and state database, what the daemon
would decide; ``reload`` asks the daemon to read its policy file again.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from warden._errors import WardenError
from warden.cli._console import warden_exit
from warden.cli.remote import HostOption

if TYPE_CHECKING:
    from warden.config import Paths
    from warden.policy.access import Target

policy_app = typer.Typer(
    help="Check and reload the access policy ($WARDEN_HOME/policy.toml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_DENIED = 1


def parse_principal(text: str) -> tuple[str, frozenset[str]]:
    """``name`` or ``name:role1,role2`` as a name and its roles; a unix user without a passwd
    entry is named ``uid:N`` (``uid:1001:user``)."""
    m = re.fullmatch(r"(uid:\d+|[^:]+)(?::([^:]*))?", text)
    if m is None:
        raise typer.BadParameter(f"{text!r} is not NAME or NAME:ROLE,ROLE")
    return m.group(1), frozenset(r for r in (m.group(2) or "").split(",") if r)


@policy_app.command("check")
def check(
    principal: Annotated[
        str,
        typer.Argument(
            help="NAME or NAME:ROLE1,ROLE2. A bare NAME has only the roles that policy.toml's "
            "[principals] gives it."
        ),
    ],
    action: Annotated[str, typer.Argument(help="create, exec, exec-as-root, inspect, ...")],
    sandbox: Annotated[
        str | None,
        typer.Argument(help="Id or name; leave it out for a daemon-wide action (admin)."),
    ] = None,
) -> None:
    """Print allow or deny and the rule that decided, as the daemon would (offline).

    Exits 0 on allow, 1 on deny. For exec and files-*, a second line says whether the
    sandbox's [[guest]] rules accept that operation.
    """
    from warden.auth.principal import Principal
    from warden.config import Paths
    from warden.policy.access import GUEST_OPS, Target, load_policy

    name, roles = parse_principal(principal)
    paths = Paths.from_env()
    try:
        policy = load_policy(paths)
        target = _target(paths, sandbox) if sandbox else Target.daemon()
    except WardenError as exc:
        raise warden_exit(exc) from None
    who = Principal(name, roles, via="local")
    decision = policy.decide(who, action, target)
    print(f"{'allow' if decision.allowed else 'deny'}\t{decision.rule}")
    guest_ok = True
    if target.sandbox and action in GUEST_OPS:
        guest = policy.guest_allows(action, target)
        guest_ok = guest.allowed
        print(f"guest {'accepts' if guest_ok else 'refuses'}\t{guest.rule}")
    if not (decision.allowed and guest_ok):
        raise typer.Exit(EXIT_DENIED)


def _target(paths: Paths, ref: str) -> Target:
    """The stored sandbox ``ref`` (id or name) as the policy sees it; VMNotFoundError if this
    host's state database has none."""
    from warden._errors import VMNotFoundError
    from warden.policy.access import target_of
    from warden.store.db import Store, db_path

    if not db_path(paths).exists():
        raise VMNotFoundError(f"no VM has id or name {ref!r}: {db_path(paths)} does not exist")
    with Store.open(paths) as store:
        row = store.get_vm(ref) or store.get_vm_by_name(ref)
    if row is None:
        raise VMNotFoundError(f"no VM has id or name {ref!r}; `warden ps --all` lists them")
    return target_of(row)


@policy_app.command("default")
def default() -> None:
    """Print the shipped default policy (what applies without $WARDEN_HOME/policy.toml), to
    start a policy.toml from."""
    from importlib import resources

    sys.stdout.write(resources.files("warden.policy").joinpath("default.toml").read_text("utf-8"))


@policy_app.command("reload")
def reload(host: HostOption = None) -> None:
    """Have the daemon read policy.toml again. A bad file is refused (the message names the
    line or key) and the policy in force stays."""
    from warden.cli.remote import _check, _client

    with _client(host) as c:
        answer = _check(c.post("/v1/policy/reload"))
    print(json.dumps(answer))
