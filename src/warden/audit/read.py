"""Read the audit log: :func:`records` (filtered) and :func:`follow` (``tail -f``).

Readers take no lock and never write: they read whole lines only, so an append in progress
(or a torn tail after a crash) is never returned as a record. They do not check MACs; that is
``verify``'s job.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden._errors import AuditLogError
from warden.audit._format import log_path

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Filter:
    """Which records to keep; None matches anything."""

    principal: str | None = None
    sandbox: str | None = None
    action: str | None = None
    since: float | None = None

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.principal is not None and rec.get("principal") != self.principal:
            return False
        if self.sandbox is not None and rec.get("sandbox") != self.sandbox:
            return False
        if self.action is not None and rec.get("action") != self.action:
            return False
        when = rec.get("time")
        return self.since is None or (isinstance(when, int | float) and when >= self.since)


def records(
    home: Path,
    *,
    principal: str | None = None,
    sandbox: str | None = None,
    action: str | None = None,
    since: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Every whole record of the log, oldest first, that matches all the filters given."""
    keep = Filter(principal, sandbox, action, since)
    with _open(home) as f:
        for rec in _read_lines(f):
            if keep(rec):
                yield rec


def follow(
    home: Path,
    *,
    principal: str | None = None,
    sandbox: str | None = None,
    action: str | None = None,
    since: float | None = None,
    last: int | None = None,
    poll_s: float = 0.25,
    stop: Callable[[], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """The matching records (only the ``last`` N of those there now, if given), then each new
    one as it is appended; ends when ``stop()`` returns true (never, by default)."""
    keep = Filter(principal, sandbox, action, since)
    with _open(home) as f:
        backlog: deque[dict[str, Any]] = deque(maxlen=last if last is not None else None)
        backlog.extend(rec for rec in _read_lines(f) if keep(rec))
        yield from backlog
        while stop is None or not stop():
            got = False
            for rec in _read_lines(f):
                got = True
                if keep(rec):
                    yield rec
            if not got:
                time.sleep(poll_s)


def _open(home: Path) -> Any:
    path = log_path(home)
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise AuditLogError(f"there is no audit log at {path}") from None
    except PermissionError as exc:
        raise AuditLogError(
            f"cannot read the audit log {path} ({exc.strerror}): run as the owner of "
            "$WARDEN_HOME (root)"
        ) from exc


def _read_lines(f: Any) -> Iterator[dict[str, Any]]:
    """Each whole line from where ``f`` is, parsed; ``f`` is left just after the last whole
    line. A line that is not a JSON object is skipped (``verify`` reports it)."""
    offset = f.tell()
    pending = b""
    while chunk := f.read(_CHUNK):
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for raw in whole:
            offset += len(raw) + 1
            rec = _parse(raw)
            if rec is not None:
                yield rec
    f.seek(offset)  # a partial last line is read again, whole, next time


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``1d``, ``30s`` ago, or an ISO 8601 time (UTC unless it says), as a
    unix time. ValueError with what is accepted."""
    from datetime import UTC, datetime

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give an ISO time (2026-12-01T05:00:00Z) or an age "
            "such as 30s, 10m, 2h, 1d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
