"""The manager's persistent state: one SQLite file, ``$WARDEN_HOME/state.db``."""

from __future__ import annotations

from warden.store.db import (
    ACTIVE_STATES,
    ActiveVM,
    EventRow,
    Reservations,
    Store,
    VMRow,
    db_path,
)

__all__ = ["ACTIVE_STATES", "ActiveVM", "EventRow", "Reservations", "Store", "VMRow", "db_path"]
