"""Issue 7, parts 3 and 4: what checking the image and the boot template costs a new process.

``warden run -- true`` (embedded, a clone of the boot template), alternating in one run
between three ways of remembering verified files:

* ``record``: as shipped: a file's SHA-256 is remembered in ``cache/verified.json`` by its
  stat, so a new process hashes nothing that did not change;
* ``images per process``: the image files are hashed again by every process (what warden did
  before: a memo per process); the template's ``state.bin`` digest is still remembered;
* ``nothing remembered``: the image files and the template's ``state.bin`` are hashed by every
  process (its RAM is hashed by every process anyway, as it is copied into a sealed memfd).

And, in this process: the time to hash each file, and ``Templates.load`` of the 256 MiB boot
template (check the seal, copy its RAM into a sealed memfd checking its digest, check the
device state's digest) with the device state's digest remembered and without. Boot snapshots
(a full ``state.bin`` restored) are gone; their ``open_sealed`` took 0.3 ms remembered and
about 50 ms hashing 70 MB (docs/benchmarks.md).

Run with ``python -m bench.verify``; results go to ``bench/results/verify-<utc time>.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import RESULTS, pct
from warden.config import Paths
from warden.image.store import KINDS, load_image
from warden.seal import digests, sha256_fd
from warden.vmm import templates
from warden.vmm.spec import VMSpec
from warden.vmm.templates import STATE_FILE, Templates, boot_template_name

ROUNDS = 10
MODES = ("record", "images per process", "nothing remembered")
DRIVER = """
import sys
from warden.cli.main import main
from warden.image import store
from warden.seal import digests
mode = sys.argv[1]
if mode == "images per process":
    store.digest_record = lambda paths: digests.DigestRecord(None)
elif mode == "nothing remembered":
    digests.DigestRecord._read = lambda self: {}
    digests.DigestRecord._write = lambda self, record: None
sys.argv = ["warden", "run", "--", "true"]
sys.exit(main())
"""


def run_true(mode: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", DRIVER, mode], check=True)
    return time.perf_counter() - start


def hash_ms(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        sha256_fd(fd)  # from the page cache, as a restore right after another one reads it
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            sha256_fd(fd)
            best = min(best, time.perf_counter() - start)
    finally:
        os.close(fd)
    return best * 1000


def load_ms(store: Templates, name: str, remembered: bool) -> float:
    """``Templates.load`` of ``name`` as a new process does it (no verified RAM in memory)."""
    times: list[float] = []
    for _ in range(5):
        digests._memo.clear()
        templates._forget_ram(store.path(name))
        record = store.digests
        if not remembered:
            store.digests = digests.DigestRecord(None)  # nothing read from the record
        start = time.perf_counter()
        loaded = store.load(name)
        times.append(time.perf_counter() - start)
        store.digests = record
        loaded.state.close()
    templates._forget_ram(store.path(name))
    return statistics.median(times) * 1000


def in_process(paths: Paths) -> dict[str, Any]:
    image = load_image(paths, "default")
    out: dict[str, Any] = {
        f"hash_{kind}_ms": round(hash_ms(getattr(image, kind).path), 1) for kind in KINDS
    }
    out["image_mb"] = round(sum(getattr(image, k).size for k in KINDS) / 1e6, 1)
    store = Templates(paths)
    name = next(
        (n for a in ("kvm", "tcg") if store.exists(n := boot_template_name(VMSpec(), accel=a))),
        "",
    )
    if name:
        info = store.info(name)
        out["template_disk_mb"] = round(info.disk_bytes / 1e6, 1) if info else None
        out["hash_state_ms"] = round(hash_ms(store.path(name) / STATE_FILE), 1)
        out["load_remembered_ms"] = round(load_ms(store, name, True), 1)
        out["load_hashing_ms"] = round(load_ms(store, name, False), 1)
    return out


def main() -> None:
    paths = Paths.from_env()
    for mode in MODES:  # warm up: the template exists, the record is filled, caches are hot
        run_true(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(ROUNDS):
        for mode in MODES:
            times[mode].append(run_true(mode))
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": ROUNDS,
        "warden_run_true_s": {
            m: {"p50": round(pct(t, 0.5), 3), "p90": round(pct(t, 0.9), 3)}
            for m, t in times.items()
        },
        "in_process": in_process(paths),
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%z")
    (RESULTS / f"verify-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
