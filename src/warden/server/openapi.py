"""The daemon's OpenAPI spec, as checked in at ``docs/openapi.json``.

Regenerate the file after changing the API (a unit test fails while they differ)::

    .venv/bin/python -m warden.server.openapi            # writes docs/openapi.json
    .venv/bin/python -m warden.server.openapi --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

from warden.config import Paths
from warden.policy.access import shipped_policy
from warden.server.access import AccessControl
from warden.server.app import create_app
from warden.server.manager import Manager

SPEC_FILE = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def spec() -> dict[str, Any]:
    """The spec the daemon serves at ``/openapi.json``. Building it needs no manager: the app
    touches its manager only to answer requests."""
    unused = AccessControl(Paths(Path("/nonexistent")), shipped_policy())
    app = create_app(cast(Manager, None), manage_lifespan=False, access=unused)
    return app.openapi()


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args == ["--check"]:
        if not SPEC_FILE.exists() or SPEC_FILE.read_text() != text:
            print(
                f"{SPEC_FILE} is out of date; run `python -m warden.server.openapi`",
                file=sys.stderr,
            )
            return 1
        return 0
    if args:
        print("usage: python -m warden.server.openapi [--check]", file=sys.stderr)
        return 2
    SPEC_FILE.write_text(text)
    print(f"wrote {SPEC_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
