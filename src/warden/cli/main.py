"""The ``warden`` entry point.

``warden run`` in its common forms is parsed here by hand and run without typer: typer 0.29
coerces every option through a pydantic TypeAdapter, and importing typer, click and pydantic
costs ~0.3 s before the VM is even asked for (issue 8: ``warden run -- true`` must spend at
most 0.3 s in warden's own code outside the VM). Anything this parser is not sure of (``--help``,
an unknown option, a bad value, ``--require-jail`` with ``--host``) goes to the typer app in
``cli/app.py``, which stays the authority on what ``run`` accepts and on its error messages;
``tests/unit/test_cli_imports.py`` checks that both read every argv the same way.

The app's names (``app``, ``EXIT_WARDEN_ERROR``...) are reachable here, loaded on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from warden.cli.run import RunArgs

_FLAGS = {
    "-i": "interactive",
    "--interactive": "interactive",
    "--shell": "shell",
    "--cold": "cold",
    "--require-jail": "require_jail",
}
_VALUES = {
    "--image": "image",
    "--memory": "memory",
    "--cpus": "cpus",
    "--timeout": "timeout",
    "-e": "env",
    "--env": "env",
    "-u": "user",
    "--user": "user",
    "--host": "host",
    "--template": "template",
}
_CONVERT: dict[str, type] = {"memory": int, "cpus": int, "timeout": float}


def parse_run(argv: list[str]) -> RunArgs | None:
    """``warden run``'s arguments (after ``run``) as typer would read them, or None when this
    parser is not sure (then typer parses them, and reports any problem)."""
    values: dict[str, Any] = {}
    env: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break  # the command: options end at the first argument (allow_interspersed_args)
        i = _take_option(argv, i, values, env)
        if i < 0:
            return None  # --help, an unknown or combined option: typer's to explain
    cmd = argv[i:]
    if not cmd:
        return None
    return _build(cmd, values, env)


def _take_option(argv: list[str], i: int, values: dict[str, Any], env: list[str]) -> int:
    """Read the option at ``argv[i]`` (and its value) into ``values`` or ``env``: the index of
    the next argument, or -1 if this parser does not know it."""
    name, eq, inline = argv[i].partition("=")
    if name in _FLAGS and not eq:
        values[_FLAGS[name]] = True
        return i + 1
    if name not in _VALUES:
        return -1
    if not eq:  # the value is the next argument
        if i + 1 == len(argv):
            return -1
        i += 1
    raw = inline if eq else argv[i]
    if _VALUES[name] == "env":
        env.append(raw)
    else:
        values[_VALUES[name]] = raw
    return i + 1


def _build(cmd: list[str], values: dict[str, Any], env: list[str]) -> RunArgs | None:
    for key, convert in _CONVERT.items():
        if key in values:
            try:
                values[key] = convert(values[key])
            except ValueError:
                return None
    env_map: dict[str, str] = {}
    for pair in env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return None
        env_map[key] = value
    host = values.get("host")
    if host is None:
        host = os.environ.get("WARDEN_HOST") or None
    if values.get("require_jail") and host:
        return None  # refused, with typer's message
    values["host"] = host
    return RunArgs(cmd=cmd, env=env_map, **values)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        args = parse_run(argv[1:])
        if args is not None:
            from warden.cli.run import run_command

            sys.exit(run_command(args))
    from warden.cli.app import app

    app()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("warden.cli.app"), name)
