"""The checked-in docs/openapi.json is the spec the daemon serves."""

from __future__ import annotations

import json

from warden.server import openapi


def test_checked_in_spec_matches_the_served_one() -> None:
    served = openapi.spec()
    checked_in = json.loads(openapi.SPEC_FILE.read_text())
    assert checked_in == served, (
        "docs/openapi.json differs from the API; regenerate it with "
        "`.venv/bin/python -m warden.server.openapi`"
    )
    assert openapi.main(["--check"]) == 0


def test_spec_covers_the_api() -> None:
    paths = openapi.spec()["paths"]
    for path in (
        "/v1/sandboxes",
        "/v1/sandboxes/{ref}",
        "/v1/sandboxes/{ref}/exec",
        "/v1/sandboxes/{ref}/files",
        "/v1/sandboxes/{ref}/files/stat",
        "/v1/sandboxes/{ref}/files/list",
        "/v1/sandboxes/{ref}/files/mkdir",
        "/v1/events",
        "/v1/templates",
        "/v1/templates/{name}",
        "/v1/sandboxes/{ref}/template",
        "/v1/info",
        "/metrics",
    ):
        assert path in paths, path
