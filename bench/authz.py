"""Issue 9: what authorization and the audit log cost an exec.

Two daemons run at once, and the same SDK call, ``sbx.commands.run(["true"])``, alternates
between a sandbox of each:

* **full**: ``warden serve``, as shipped: the caller's principal from its peer credentials,
  the access policy on every route, and every exec recorded in the audit log (on disk, synced,
  before the command's status goes out);
* **baseline**: the same daemon code with neither: no access check (the ``authorize``
  dependency overridden by a fixed admin grant, as before the policy) and no audit log
  (``Manager(audit=False)``), on a home of its own that shares the images (one writer per
  log, one manager per store).

The cost is ``p50(full) / p50(baseline) - 1``; the target is at most 5%.

Then the access policy alone (``--only policy``; ``policy.py``): one Manager and one VM, served
by two apps in one event loop, the real one and the same app with ``authorize`` overridden the
same way; the raw exec request of ``true`` alternates between them, as a principal the policy
allows by a ``user`` rule after twenty rules that do not match.

Run with ``python -m bench.authz [-n N] [--only daemons|policy]``; results go to
``bench/results/authz-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

import warden
from bench.run import RESULTS, pct
from warden import records
from warden.auth.principal import LOCAL_ADMIN, SCOPE_KEY, Principal
from warden.config import Paths
from warden.policy.access import policy_path
from warden.server import Manager, create_app
from warden.server.access import ROUTES, AccessControl, Grant, authorize, control_of

WARDEN = str(Path(sys.executable).parent / "warden")
TARGET = 0.05


class Server:
    """A daemon subprocess on a socket of its own, stopped by its pid."""

    def __init__(self, argv: list[str], socket: Path, env: dict[str, str]) -> None:
        self.socket = socket
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:3]} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def unchecked(request: Request) -> Grant:
    """What the daemon did before the policy: every caller an admin, nothing looked up (the
    baseline's override of ``server/access.authorize``)."""
    path = str(getattr(request.scope.get("route"), "path", request.url.path))
    return Grant(LOCAL_ADMIN, control_of(request), ROUTES[(request.method, path)])


def serve_baseline(socket: str) -> None:
    """The baseline daemon (this module run with ``--serve-baseline``)."""
    from warden.policy.admission import AdmissionPolicy

    paths = Paths.from_env()
    manager = Manager(paths, policy=AdmissionPolicy(charge="limits"), audit=False)
    app = create_app(manager)
    app.dependency_overrides[authorize] = unchecked
    config = uvicorn.Config(app, uds=socket, lifespan="on", log_level="warning", log_config=None)
    asyncio.run(uvicorn.Server(config).serve())


def shared_home(tmp: Path, name: str) -> Path:
    """A home of its own under ``tmp`` that shares the real one's images (read only)."""
    real = Paths.from_env().home
    home = tmp / name
    home.mkdir(mode=0o700)
    for shared in ("cache", "images"):
        (real / shared).mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / shared).symlink_to(real / shared)
    return home


async def _measure(full: str, baseline: str, n: int) -> dict[str, Any]:
    a = await warden.connect(full).AsyncSandbox.create()
    b = await warden.connect(baseline).AsyncSandbox.create()
    try:
        for _ in range(20):  # warm-up: TCG's translations, keep-alive connections
            await a.commands.run(["true"])
            await b.commands.run(["true"])
        with_: list[float] = []
        without: list[float] = []
        for i in range(n):
            for sbx, into in ((a, with_), (b, without)) if i % 2 else ((b, without), (a, with_)):
                t0 = time.perf_counter()
                r = await sbx.commands.run(["true"])
                into.append(time.perf_counter() - t0)
                if r.exit_code != 0:
                    raise RuntimeError(f"exec of true failed: {r!r}")
    finally:
        await a.kill()
        await b.kill()
    f50, b50 = pct(with_, 0.5) * 1e3, pct(without, 0.5) * 1e3
    return {
        "metric": "exec true p50 (ms): authorization + audit vs neither",
        "full": round(f50, 3),
        "baseline": round(b50, 3),
        "overhead": round(f50 / b50 - 1, 4),
        "target": TARGET,
        "full_p95": round(pct(with_, 0.95) * 1e3, 3),
        "baseline_p95": round(pct(without, 0.95) * 1e3, 3),
        "n": n,
    }


def measure_daemons(n: int) -> dict[str, Any]:
    """Authorization + audit against neither, on two daemons at once."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-authz-"))
    servers: list[Server] = []
    try:
        full_sock, base_sock = tmp / "full.sock", tmp / "base.sock"
        servers.append(
            Server([WARDEN, "serve", "--socket", str(full_sock), "--charge", "limits"],
                   full_sock, dict(os.environ))
        )  # fmt: skip
        env = {**os.environ, "WARDEN_HOME": str(shared_home(tmp, "baseline-home"))}
        argv = [sys.executable, "-m", "bench.authz", "--serve-baseline", str(base_sock)]
        servers.append(Server(argv, base_sock, env))
        return asyncio.run(_measure(f"unix://{full_sock}", f"unix://{base_sock}", n))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


ALICE = Principal("alice", frozenset({"user"}), via="unix", uid=1000)
FILLER = "".join(
    f'\n[[rules]]\nname = "team-{i}"\nroles = ["team-{i}"]\nactions = ["exec", "inspect"]\n'
    f'labels = {{ team = "{i}" }}\n'
    for i in range(20)
)
"""Twenty rules that do not match, so that a decision walks a policy larger than the default."""


class As:
    """Every request is ``principal``'s (the authenticating middleware's part, fixed)."""

    def __init__(self, app: ASGIApp, principal: Principal) -> None:
        self.app, self.principal = app, principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, SCOPE_KEY: self.principal}
        await self.app(scope, receive, send)


def _exec_raw(c: httpx.Client, url: str) -> float:
    """One raw exec request of ``true``: its seconds."""
    t0 = time.perf_counter()
    r = c.post(url, json={"cmd": ["true"]})
    elapsed = time.perf_counter() - t0
    last = records.RecordDecoder().feed(r.content)[-1]
    if r.status_code != 200 or not isinstance(last[1], dict) or last[1].get("exit_code") != 0:
        raise RuntimeError(f"exec failed: {r.status_code} {r.content[:300]!r}")
    return elapsed


@contextlib.contextmanager
def _serving(apps: list[ASGIApp], tmp: Path) -> Iterator[list[httpx.Client]]:
    """Serve ``apps`` (the first one with the manager's lifespan) in one event loop on a
    thread, each on a unix socket of its own: a client of each."""
    servers = [
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off" if i else "on"))
        for i, app in enumerate(apps)
    ]
    socks = []
    for i in range(len(apps)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp / f"app-{i}.sock"))
        sock.listen(64)
        socks.append(sock)

    async def serve() -> None:
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, socks, strict=True)))

    thread = threading.Thread(target=lambda: asyncio.run(serve()))
    thread.start()
    clients = [
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(k.getsockname())),
            base_url="http://warden",
            timeout=60,
        )
        for k in socks
    ]
    try:
        while not all(s.started for s in servers):
            time.sleep(0.02)
        yield clients
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.should_exit = True
        thread.join(timeout=60)


def measure_policy(n: int) -> dict[str, Any]:
    """The access policy alone: one Manager and VM behind the real app and an unchecked one."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-policy-"))
    try:
        paths = Paths(shared_home(tmp, "home"))
        shipped = resources.files("warden.policy").joinpath("default.toml").read_text("utf-8")
        policy_path(paths).write_text(shipped.replace("[[rules]]", FILLER + "\n[[rules]]", 1))
        checked = create_app(Manager(paths))
        control: AccessControl = checked.state.access
        bare = create_app(checked.state.manager, manage_lifespan=False, access=control)
        bare.dependency_overrides[authorize] = unchecked
        with _serving([As(checked, ALICE), bare], tmp) as clients:
            r = clients[0].post("/v1/sandboxes", json={"memory_mib": 256})
            r.raise_for_status()
            url = f"/v1/sandboxes/{r.json()['id']}/exec"
            for _ in range(10):  # warm up TCG and both connections
                for c in clients:
                    _exec_raw(c, url)
            times: list[list[float]] = [[], []]
            for _ in range(n):
                for i in (0, 1):
                    times[i].append(_exec_raw(clients[i], url))
            clients[0].delete(url.removesuffix("/exec"), params={"force": "true"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p50 = [pct(t, 0.5) * 1e3 for t in times]
    return {
        "metric": "exec true p50 (ms), with the access policy vs without",
        "with_policy": round(p50[0], 3),
        "without": round(p50[1], 3),
        "added_ms": round(p50[0] - p50[1], 3),
        "ratio": round(p50[0] / p50[1], 3),
        "with_policy_p95": round(pct(times[0], 0.95) * 1e3, 3),
        "without_p95": round(pct(times[1], 0.95) * 1e3, 3),
        "iterations": n,
        "rules": len(control.policy.rules),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="execs per daemon or app")
    parser.add_argument("--only", choices=("daemons", "policy"), help="one measurement only")
    parser.add_argument("--serve-baseline", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return
    rows: list[dict[str, Any]] = []
    if args.only in (None, "daemons"):
        row = measure_daemons(args.n)
        print(json.dumps(row, indent=2))
        verdict = "PASS" if row["overhead"] <= TARGET else "MISS"
        print(
            f"authorization + audit on exec p50: {row['overhead']:+.1%} (target <= 5%): {verdict}"
        )
        rows.append(row)
    if args.only in (None, "policy"):
        rows.append(measure_policy(args.n))
        print(json.dumps(rows[-1], indent=2))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"authz-{stamp}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
