"""Facts about host files that cost a subprocess to learn, remembered under those files' stat:
``$WARDEN_HOME/cache/host-facts.json``.

Two facts are learnt on every launch otherwise, in every new process:

* QEMU's version (``qemu-system-x86_64 --version``: ~15 ms), which templates and the KVM
  probe's verdict are keyed by;
* the files a jailed QEMU needs in its root (``jail/files.py``: two runs of the dynamic
  loader, ~10 ms).

A fact is remembered with the stat of every file it was learnt from (QEMU's binary; the
binary, its libraries, its TCG module, the firmware and ``/etc/ld.so.cache``), and used only
while each of them is unchanged: same device, inode, size, mtime and ctime. A package upgrade
puts new files in place by rename (a new inode), and any write changes the ctime, which
cannot be set back (``seal/digests.py`` gives the argument, and its rule for writes in the
same clock tick: a fact is remembered only if its files had not changed for ``RACY_NS`` when
it was learnt). The record is root's (0600 in the 0700 cache dir); one that does not parse
counts as empty. A wrong fact would make QEMU fail to start or a template be refused, never
let anything in: the jail binds only what is listed, read-only, and templates are checked
against their seal.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from warden.seal.digests import RACY_NS, read_record, write_record

log = logging.getLogger(__name__)

RECORD_NAME = "host-facts.json"
RECORD_FORMAT = 1
RECORD_MAX_BYTES = 1 << 20
RECORD_MAX_FACTS = 64
_STAT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")

T = TypeVar("T", str, list[str])
_lock = threading.Lock()


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [getattr(st, f) for f in _STAT_FIELDS]


class HostFacts:
    """The facts remembered in ``<directory>/host-facts.json``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / RECORD_NAME

    def get(self, name: str, learn: Callable[[], T], files: Callable[[T], Iterable[str]]) -> T:
        """Fact ``name``: remembered if every file it was learnt from is unchanged, else
        ``learn()``, remembered under the stat of ``files(fact)``."""
        entry = self._read().get(name)
        if entry is not None and _still_true(entry):
            value = entry["value"]
            if isinstance(value, str | list):
                return value  # type: ignore[return-value]  # as it was stored: a T
        began = time.time_ns()
        value = learn()
        stats = {p: _stat(p) for p in files(value)}
        if all(s is not None and began - s[-1] >= RACY_NS for s in stats.values()):
            self._remember(name, {"value": value, "stats": stats})
        return value

    def _remember(self, name: str, entry: dict[str, Any]) -> None:
        with _lock:
            facts = self._read()
            facts.pop(name, None)  # re-inserted last: the newest are the ones kept
            facts[name] = entry
            kept = dict(list(facts.items())[-RECORD_MAX_FACTS:])
            try:
                self._write({"format": RECORD_FORMAT, "facts": kept})
            except OSError as exc:
                log.warning("could not write %s (learnt again next time): %s", self.path, exc)

    def _read(self) -> dict[str, dict[str, Any]]:
        return read_record(self.path, RECORD_FORMAT, "facts", RECORD_MAX_BYTES)

    def _write(self, record: dict[str, Any]) -> None:
        write_record(self.path, record)


def _still_true(entry: dict[str, Any]) -> bool:
    stats = entry.get("stats")
    if not isinstance(stats, dict) or not stats:
        return False
    return all(_stat(str(path)) == stat for path, stat in stats.items())
