"""The CLI's start-up path stays light (issue 8, "fast everywhere else"): no command but serve
loads the daemon's server (FastAPI, uvicorn), and ``warden run`` loads neither typer, click,
pydantic, httpx nor rich on its way to a VM. Its hand parser reads argv as the typer command
does, and leaves to typer what it is not sure of."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warden.cli.main import parse_run
from warden.cli.run import RunArgs

SERVER = ("fastapi", "uvicorn", "starlette", "warden.server.app")
HEAVY = (*SERVER, "typer", "click", "pydantic", "httpx", "rich", "warden.sdk._remote")


def _loaded(code: str, names: tuple[str, ...], env: dict[str, str] | None = None) -> list[str]:
    probe = (
        "import atexit, json, sys\n"
        f"names = {names!r}\n"
        "atexit.register(lambda: print('LOADED=' + json.dumps("
        "sorted(m for m in names if m in sys.modules))))\n" + code
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("LOADED=")]
    assert line, out.stdout + out.stderr
    return list(json.loads(line[-1].removeprefix("LOADED=")))


def test_importing_the_cli_loads_no_server() -> None:
    assert _loaded("import warden.cli.main", SERVER) == []


def test_the_cli_entry_point_loads_nothing_heavy() -> None:
    assert _loaded("import warden.cli.main", HEAVY) == []


def test_warden_run_loads_no_server_typer_pydantic_nor_httpx(tmp_path: Path) -> None:
    """Up to the VM's launch, which fails at once here (no such image): every module of the
    embedded run path is imported by then."""
    code = (
        "sys.argv = ['warden', 'run', '--image', 'no-such-image', '--', 'true']\n"
        "from warden.cli.main import main\n"
        "main()\n"
    )
    env = {"WARDEN_HOME": str(tmp_path), "WARDEN_HOST": ""}
    loaded = _loaded(code, HEAVY, env)
    # rich prints the error: allowed on the failure path only.
    assert [m for m in loaded if m != "rich"] == [], loaded


def test_warden_policy_check_loads_no_server(tmp_path: Path) -> None:
    """It answers offline, from policy.toml and state.db, without FastAPI or uvicorn."""
    code = (
        "sys.argv = ['warden', 'policy', 'check', 'alice:user', 'admin']\n"
        "from warden.cli.main import main\n"
        "main()\n"
    )
    assert _loaded(code, SERVER, {"WARDEN_HOME": str(tmp_path)}) == []


def test_the_server_package_still_offers_its_names() -> None:
    import warden.server

    assert callable(warden.server.create_app) and warden.server.Manager.__name__ == "Manager"


def test_the_app_names_are_reachable_from_main() -> None:
    from warden.cli import main

    assert main.EXIT_WARDEN_ERROR == 125 and main.app.info.name == "warden"


# -- the hand parser against typer's own --------------------------------------------------

AGREE = [
    ["--", "true"],
    ["true"],
    ["echo", "hi", "--memory", "512"],
    ["--memory", "512", "--cpus", "2", "--", "sh", "-c", "echo $X"],
    ["--memory=384", "--image=default", "--", "true"],
    ["--timeout", "2.5", "-e", "A=1", "--env", "B=x=y", "-e", "C=", "--", "env"],
    ["-i", "--shell", "--cold", "--", "cat", "|", "wc"],
    ["--user", "root", "--", "id"],
    ["-u", "root", "id"],
    ["--host", "unix:///tmp/nowhere.sock", "--", "true"],
    ["--require-jail", "--", "true"],
    ["--template", "py", "--", "python3"],
    ["--", "--help"],
    ["--", "-i"],
    ["-", "x"],
]

FALLBACK = [
    [],
    ["--"],
    ["--help"],
    ["--memory", "lots", "--", "true"],
    ["--timeout", "soon", "--", "true"],
    ["-e", "NOEQUALS", "--", "true"],
    ["-e", "=v", "--", "true"],
    ["--colour", "red", "--", "true"],
    ["-ie", "A=1", "--", "true"],
    ["-uroot", "--", "true"],
    ["--memory"],
    ["--cold=yes", "--", "true"],
    ["--require-jail", "--host", "unix:///x", "--", "true"],
]


def _typer_params(argv: list[str]) -> dict[str, object]:
    from typer.main import get_command

    from warden.cli.app import app

    group = get_command(app)
    command = group.commands["run"]  # type: ignore[attr-defined]
    ctx = command.make_context("run", list(argv))
    return dict(ctx.params)


def _as_typer(args: RunArgs) -> dict[str, object]:
    fields = {
        "cmd": args.cmd,
        "image": args.image,
        "memory": args.memory,
        "cpus": args.cpus,
        "timeout": args.timeout,
        "env": [f"{k}={v}" for k, v in args.env.items()],
        "interactive": args.interactive,
        "shell": args.shell,
        "cold": args.cold,
        "template": args.template,
        "user": args.user,
        "host": args.host,
        "require_jail": args.require_jail,
    }
    return fields


@pytest.mark.parametrize("argv", AGREE, ids=" ".join)
def test_the_hand_parser_reads_argv_as_typer_does(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WARDEN_HOST", raising=False)
    parsed = parse_run(argv)
    assert parsed is not None, f"the fast path gave {argv} to typer"
    expected = _typer_params(argv)
    expected["cmd"] = list(expected["cmd"])  # type: ignore[call-overload]
    expected["env"] = list(expected["env"] or [])  # type: ignore[call-overload]
    assert _as_typer(parsed) == expected


@pytest.mark.parametrize("argv", FALLBACK, ids=lambda a: " ".join(a) or "(none)")
def test_what_the_hand_parser_is_unsure_of_goes_to_typer(argv: list[str]) -> None:
    assert parse_run(argv) is None


def test_the_host_comes_from_the_environment_as_typer_takes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARDEN_HOST", "unix:///tmp/elsewhere.sock")
    parsed = parse_run(["--", "true"])
    assert parsed is not None and parsed.host == "unix:///tmp/elsewhere.sock"
    assert _typer_params(["--", "true"])["host"] == parsed.host
    assert parse_run(["--require-jail", "--", "true"]) is None  # refused by typer, with why


def test_the_hand_parser_knows_every_option_of_the_typer_command() -> None:
    from typer.main import get_command

    from warden.cli import main
    from warden.cli.app import app

    command = get_command(app).commands["run"]  # type: ignore[attr-defined]
    typer_opts = {o for p in command.params for o in p.opts if o.startswith("-")}
    typer_opts.discard("--help")
    assert typer_opts == set(main._FLAGS) | set(main._VALUES)
