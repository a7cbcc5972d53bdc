"""The agent as the image carries it: only its bundled files, the stdlib, and no site.

bundle.guest_files() is copied to a temp dir and run there with ``python3 -E -s -S`` and only
that dir (plus the stdlib) on sys.path, so a host-only import fails here, not at a VM's boot.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.guest_raw import RawHost, user_home
from warden.agent import bundle
from warden.wire.frame import SESSION_VERSION

ISOLATED = [sys.executable, "-E", "-s", "-S"]


def unpack(root: Path) -> Path:
    """Write the guest files under ``root``; the agent's dir."""
    for rel, data in bundle.guest_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / bundle.GUEST_ROOT


def test_the_bundle_holds_the_package_and_the_wire_names() -> None:
    files = bundle.guest_files()
    names = {rel.removeprefix(bundle.GUEST_ROOT + "/") for rel in files}
    assert {"agent_main.py", "warden/wire/frame.py", "warden/wire/ops.py"} <= names
    assert {f"warden/channel/{name}" for name in bundle.CHANNEL_MODULES} <= names
    assert files[f"{bundle.GUEST_ROOT}/warden/channel/__init__.py"] == b""
    assert {"warden/guest/__init__.py", "warden/guest/pid1.py", "warden/guest/session.py"} <= names
    assert files[f"{bundle.GUEST_ROOT}/warden/__init__.py"] == b""  # nothing host-only runs
    assert not any("agent/guest.py" in name for name in names)


def test_the_agent_imports_with_only_its_files(tmp_path: Path) -> None:
    guest_dir = unpack(tmp_path)
    probe = (
        "import sys\n"
        f"sys.path[:] = [{str(guest_dir)!r}] + [p for p in sys.path[1:] if 'packages' not in p]\n"
        f"import {bundle.AGENT_MODULE}\n"
        "mods = sorted(m for m in sys.modules if m.startswith('warden'))\n"
        "print(' '.join(mods))\n"
        "print(sys.modules['warden'].__file__)\n"
    )
    out = subprocess.run(
        [*ISOLATED, "-c", probe],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    modules, origin = out.stdout.split("\n")[:2]
    assert origin.startswith(str(guest_dir)), "the host's warden was imported"
    assert "warden.wire.frame" in modules and "warden.guest.session" in modules
    # nothing of the host package: only the guest package, the wire and the channel modules
    allowed = {"warden", "warden.wire", "warden.wire.frame", "warden.wire.ops", "warden.channel"}
    allowed |= {f"warden.channel.{name}" for name in ("errors", "noise", "transport")}
    extra = [m for m in modules.split() if m not in allowed and not m.startswith("warden.guest")]
    assert extra == []
    # and the start stays light: no typing at import (slow under TCG)
    check = probe + "assert 'typing' not in sys.modules, 'typing was imported'\n"
    light = subprocess.run(
        [*ISOLATED, "-c", check], check=False, cwd=tmp_path, capture_output=True, text=True
    )
    assert light.returncode == 0, light.stderr


def test_the_bundled_agent_serves(tmp_path: Path) -> None:
    guest_dir = unpack(tmp_path / "root")
    main = [*ISOLATED, str(guest_dir / "agent_main.py")]
    with user_home() as home:
        _serve_and_check(RawHost(tmp_path / "agent.log", home, argv=main))


def _serve_and_check(host: RawHost) -> None:
    try:
        assert host.hello([SESSION_VERSION])["version"] == SESSION_VERSION
        host.request(1, {"op": "exec", "argv": ["echo", "bundled"], "user": "root"})
        streams, response = host.response(1)
        assert (streams["stdout"], response["exit_code"]) == (b"bundled\n", 0)
    finally:
        assert host.close() == 0
    assert "Traceback" not in host.output(), host.output()
