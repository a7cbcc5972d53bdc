"""The manager daemon: :class:`Manager` owns the host's VMs, :func:`create_app` serves its API.

Both are imported on first use: the CLI imports small modules of this package (``logs``) on
its start-up path, which must not load FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from warden.server.app import create_app
    from warden.server.manager import Manager

__all__ = ["Manager", "create_app"]

_LAZY = {"Manager": "warden.server.manager", "create_app": "warden.server.app"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'warden.server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
