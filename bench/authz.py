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

The cost is ``p50(full) / p50(baseline) - 1``; the target is at most 5%. Run with ``python -m
bench.authz [-n N]``; results go to ``bench/results/authz-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import Request

import warden
from bench.run import RESULTS, pct
from warden.config import Paths

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


def serve_baseline(socket: str) -> None:
    """The baseline daemon (this module run with ``--serve-baseline``)."""
    import uvicorn

    from warden.auth.principal import LOCAL_ADMIN
    from warden.policy.admission import AdmissionPolicy
    from warden.server.access import ROUTES, Grant, authorize, control_of
    from warden.server.app import create_app
    from warden.server.manager import Manager

    paths = Paths.from_env()
    manager = Manager(paths, policy=AdmissionPolicy(charge="limits"), audit=False)
    app = create_app(manager)

    def unchecked(request: Request) -> Grant:
        """What the daemon did before the policy: every caller an admin, nothing looked up."""
        path = str(getattr(request.scope.get("route"), "path", request.url.path))
        return Grant(LOCAL_ADMIN, control_of(request), ROUTES[(request.method, path)])

    app.dependency_overrides[authorize] = unchecked
    config = uvicorn.Config(app, uds=socket, lifespan="on", log_level="warning", log_config=None)
    asyncio.run(uvicorn.Server(config).serve())


def _baseline_home(tmp: Path) -> Path:
    """A home of its own that shares the real one's images (read only)."""
    real = Paths.from_env().home
    home = tmp / "baseline-home"
    home.mkdir(mode=0o700)
    for shared in ("cache", "images"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="execs per daemon")
    parser.add_argument("--serve-baseline", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-authz-"))
    servers: list[Server] = []
    try:
        full_sock, base_sock = tmp / "full.sock", tmp / "base.sock"
        servers.append(
            Server([WARDEN, "serve", "--socket", str(full_sock), "--charge", "limits"],
                   full_sock, dict(os.environ))
        )  # fmt: skip
        env = {**os.environ, "WARDEN_HOME": str(_baseline_home(tmp))}
        argv = [sys.executable, "-m", "bench.authz", "--serve-baseline", str(base_sock)]
        servers.append(Server(argv, base_sock, env))
        row = asyncio.run(_measure(f"unix://{full_sock}", f"unix://{base_sock}", args.n))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(row, indent=2))
    verdict = "PASS" if row["overhead"] <= TARGET else "MISS"
    print(f"authorization + audit on exec p50: {row['overhead']:+.1%} (target <= 5%): {verdict}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"authz-{stamp}.json").write_text(json.dumps({"rows": [row]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
