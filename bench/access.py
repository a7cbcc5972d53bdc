"""Issue 9: what the access policy costs an exec, on one real VM.

One Manager and one VM, served by two apps in one event loop, each on a unix socket of its own:
the real one (every request through ``server/access.authorize``: the sandbox looked up in the
store, the policy's decisions) and the same app with ``authorize`` overridden by a fixed
admin grant (what the daemon did before the policy). The same raw exec request of ``true``
goes to both, alternating, as a principal the policy allows by a ``user`` rule near the end
of a policy with more rules than the default. The added latency at p50 is the result (target:
at most 5% with the audit log; this measures the authorization part).

Run with ``python -m bench.access``; results go to ``bench/results/access-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import socket
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.run import RESULTS, pct
from warden import records
from warden.auth.principal import LOCAL_ADMIN, SCOPE_KEY, Principal
from warden.config import Paths
from warden.policy.access import policy_path
from warden.server import Manager, create_app
from warden.server.access import ROUTES, AccessControl, Grant, authorize

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


def _private_home(tmp: Path) -> Paths:
    real = Paths.from_env()
    home = tmp / "home"
    home.mkdir()
    for name in ("cache", "images"):
        (real.home / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / name).symlink_to(real.home / name)
    return Paths(home)


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock


def _exec(c: httpx.Client, url: str) -> float:
    t0 = time.perf_counter()
    r = c.post(url, json={"cmd": ["true"]})
    elapsed = time.perf_counter() - t0
    decoder = records.RecordDecoder()
    last = decoder.feed(r.content)[-1]
    if r.status_code != 200 or not isinstance(last[1], dict) or last[1].get("exit_code") != 0:
        raise RuntimeError(f"exec failed: {r.status_code} {r.content[:300]!r}")
    return elapsed


def run(iterations: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-access-"))
    paths = _private_home(tmp)
    shipped = resources.files("warden.policy").joinpath("default.toml").read_text("utf-8")
    policy_path(paths).write_text(shipped.replace("[[rules]]", FILLER + "\n[[rules]]", 1))
    manager = Manager(paths)
    checked = create_app(manager)
    control: AccessControl = checked.state.access
    bare = create_app(manager, manage_lifespan=False, access=control)
    bare.dependency_overrides[authorize] = lambda: Grant(
        LOCAL_ADMIN, control, ROUTES[("POST", "/v1/sandboxes/{ref}/exec")]
    )
    servers = [
        uvicorn.Server(uvicorn.Config(As(checked, ALICE), log_level="warning")),
        uvicorn.Server(uvicorn.Config(bare, log_level="warning", lifespan="off")),
    ]
    socks = [_listen(tmp / "checked.sock"), _listen(tmp / "bare.sock")]

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
        r = clients[0].post("/v1/sandboxes", json={"memory_mib": 256})
        r.raise_for_status()
        url = f"/v1/sandboxes/{r.json()['id']}/exec"
        for _ in range(10):  # warm up TCG and both connections
            for c in clients:
                _exec(c, url)
        times: list[list[float]] = [[], []]
        for _ in range(iterations):
            for i in (0, 1):
                times[i].append(_exec(clients[i], url))
        clients[0].delete(url.removesuffix("/exec"), params={"force": "true"})
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.should_exit = True
        thread.join(timeout=60)
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
        "iterations": iterations,
        "rules": len(control.policy.rules),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=300)
    result = run(parser.parse_args().iterations)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%z")
    (RESULTS / f"access-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
