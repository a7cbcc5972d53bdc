"""Logging to the agent's stderr (the guest console)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"warden-agent: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def log_exception(where: str) -> None:
    import traceback

    log(f"unexpected error in {where}:\n{traceback.format_exc()}")
