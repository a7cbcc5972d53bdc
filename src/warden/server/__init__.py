"""The manager daemon: :class:`Manager` owns the host's VMs, :func:`create_app` serves its API."""

from __future__ import annotations

from warden.server.app import create_app
from warden.server.manager import Manager

__all__ = ["Manager", "create_app"]
