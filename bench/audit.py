"""The audit log's cost: durable appends per second and per-append latency, from one thread,
from several threads and from asyncio tasks (``append_async``; concurrent appends share their
``fdatasync``s, group commit), and the time to verify.

``python bench/audit.py [--n 2000] [--dir DIR]``: prints one JSON object. Each append is a
typical exec record (argv digest, user, exit code, duration) written with ``fdatasync`` of
the log and of the head file; DIR (default ``$WARDEN_HOME``) must be on the disk the daemon
uses, since that is what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from warden.audit import AuditLog, verify


def _append(log: AuditLog, i: int) -> None:
    log.append(
        "exec",
        principal="bench",
        sandbox="sb",
        argv_sha256=f"{i:064x}",
        user="user",
        exit_code=0,
        duration_s=0.012,
    )


def one_thread(home: Path, n: int) -> dict[str, float]:
    lat: list[float] = []
    with AuditLog.open(home) as log:
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            _append(log, i)
            lat.append(time.perf_counter() - t)
        total = time.perf_counter() - start
    lat.sort()
    return {
        "appends_per_s": n / total,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
    }


def threads(home: Path, n: int, k: int) -> dict[str, float]:
    with AuditLog.open(home) as log:

        def work() -> None:
            for i in range(n // k):
                _append(log, i)

        pool = [threading.Thread(target=work) for _ in range(k)]
        start = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        total = time.perf_counter() - start
    return {"threads": k, "appends_per_s": (n // k) * k / total}


def tasks(home: Path, n: int, k: int) -> dict[str, float]:
    async def main(log: AuditLog) -> float:
        async def work() -> None:
            for i in range(n // k):
                await log.append_async(
                    "exec", principal="bench", sandbox="sb", argv_sha256=f"{i:064x}", exit_code=0
                )

        start = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(k)))
        return time.perf_counter() - start

    with AuditLog.open(home) as log:
        total = asyncio.run(main(log))
    return {"tasks": k, "appends_per_s": (n // k) * k / total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("WARDEN_HOME", "/tmp")))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir))
    try:
        result: dict[str, object] = {"n": args.n, "one_thread": one_thread(root / "a", args.n)}
        result["threads_4"] = threads(root / "b", args.n, 4)
        result["threads_16"] = threads(root / "b16", args.n, 16)
        result["asyncio"] = tasks(root / "c", args.n, 16)
        start = time.perf_counter()
        report = verify(root / "a")
        result["verify"] = {
            "records": report.records,
            "ok": report.ok,
            "s": round(time.perf_counter() - start, 3),
        }
    finally:
        shutil.rmtree(root)
    print(json.dumps(result, default=lambda x: round(x, 3)))


if __name__ == "__main__":
    main()
