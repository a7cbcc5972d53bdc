"""Issue 7, parts 3 and 4: what checking the image and the boot snapshot costs a new process.

``warden run -- true`` (embedded, restored from the boot snapshot), alternating in one run
between three ways of remembering verified files:

* ``record``: as shipped: a file's SHA-256 is remembered in ``cache/verified.json`` by its
  stat, so a new process hashes nothing that did not change;
* ``images per process``: the image files are hashed again by every process (what warden did
  before: a memo per process); the snapshot's digest is still remembered;
* ``nothing remembered``: the image files and the snapshot's ``state.bin`` are hashed by every
  process (what sealing would cost every restore without the record).

And, in this process: the time to hash each file, and ``BootSnapshots.open_sealed`` (open, check
the seal, the configuration and the digest) with the digest remembered and without.

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
from warden.vmm.snapshot import META_FILE, STATE_FILE, BootSnapshots, SnapshotConfig

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


def open_sealed_ms(store: BootSnapshots, config: SnapshotConfig, remembered: bool) -> float:
    times: list[float] = []
    for _ in range(5):
        digests._memo.clear()
        record = store.digests
        if not remembered:
            store.digests = digests.DigestRecord(None)  # nothing read from the record
        start = time.perf_counter()
        f = store.open_sealed(config)
        times.append(time.perf_counter() - start)
        store.digests = record
        assert f is not None, "the snapshot was refused"
        f.close()
    return statistics.median(times) * 1000


def in_process(paths: Paths) -> dict[str, Any]:
    image = load_image(paths, "default")
    out: dict[str, Any] = {
        f"hash_{kind}_ms": round(hash_ms(getattr(image, kind).path), 1) for kind in KINDS
    }
    out["image_mb"] = round(sum(getattr(image, k).size for k in KINDS) / 1e6, 1)
    store = BootSnapshots(paths)
    for d in sorted(store.root.iterdir()):
        meta_path = d / META_FILE
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("memory_mib") != 256 or "seal" not in meta:
            continue
        config = SnapshotConfig(**{f: meta[f] for f in SnapshotConfig.__dataclass_fields__})
        out["state_mb"] = round(meta["state_size"] / 1e6, 1)
        out["hash_state_ms"] = round(hash_ms(d / STATE_FILE), 1)
        out["open_sealed_remembered_ms"] = round(open_sealed_ms(store, config, True), 2)
        out["open_sealed_hashing_ms"] = round(open_sealed_ms(store, config, False), 1)
    return out


def main() -> None:
    paths = Paths.from_env()
    for mode in MODES:  # warm up: the snapshot exists, the record is filled, caches are hot
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
