"""The daemon's logs: human-readable text or one JSON object a line (``--log-format json``).

A JSON line has ``ts`` (seconds since the epoch), ``time`` (ISO 8601, UTC), ``level``,
``logger`` and ``msg``, then ``exc`` if an exception was logged, and any ``extra=`` fields
the caller passed (e.g. ``vm_id``)::

    {"ts": 1700000000.12, "time": "2023-11-14T22:13:20.120Z", "level": "INFO",
     "logger": "warden.server.manager", "msg": "VM 1a2b: running", "vm_id": "1a2b"}
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": f"{stamp}.{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in obj:
                obj[key] = value
        return json.dumps(obj, default=str)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger (uvicorn's loggers propagate to it)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
