"""Where warden keeps its files. One place decides every path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/warden")


@dataclass(frozen=True)
class Paths:
    """The data dir layout under ``$WARDEN_HOME``."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("WARDEN_HOME", str(DEFAULT_HOME))).resolve())

    @property
    def cache(self) -> Path:
        """Content-addressed build artifacts: ``cache/<kind>-<hash>/``."""
        return self.home / "cache"

    @property
    def images(self) -> Path:
        """Image manifests: ``images/<name>.json``."""
        return self.home / "images"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def vms(self) -> Path:
        """One runtime dir per live VM: ``run/vms/<id>/``."""
        return self.run / "vms"
