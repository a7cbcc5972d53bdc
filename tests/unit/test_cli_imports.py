"""The CLI's start-up path does not load the daemon's server (FastAPI, uvicorn): every
``warden`` command paid ~0.3 s for it (issue 8, "fast everywhere else")."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cli_loads_no_server() -> None:
    probe = (
        "import sys, warden.cli.main\n"
        "heavy = sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'warden.server.app') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"the CLI imported {out.stdout.strip()}"


def test_the_server_package_still_offers_its_names() -> None:
    import warden.server

    assert callable(warden.server.create_app) and warden.server.Manager.__name__ == "Manager"
