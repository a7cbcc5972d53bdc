"""Everything warden makes under $WARDEN_HOME is for root only: dirs 0700, files 0600.

One embedded VM and one daemon-made VM run at the same time, under a daemon that also listens
on TCP (so its token and TLS files exist); then the whole data dir is walked.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess, serving
from warden.config import Paths
from warden.sdk import Sandbox

pytestmark = pytest.mark.vm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(tmp_path, "--tcp", f"127.0.0.1:{_free_port()}") as d:
        yield d


def _exempt(path: Path, home: Path) -> bool:
    """A base rootfs tree (``cache/base-*/root/...``) keeps the guest's own modes: mksquashfs
    copies them into the image. Its parent ``cache/base-*`` is 0700, so only root reaches it."""
    parts = path.relative_to(home).parts
    return len(parts) >= 3 and parts[0] == "cache" and parts[1].startswith("base-")


def _bad_modes(home: Path) -> list[str]:
    """Every path under ``home`` whose mode lets anyone but its owner (root) in."""
    bad: list[str] = []
    for root, dirs, files in os.walk(home):
        here = Path(root)
        dirs[:] = [d for d in dirs if not _exempt(here / d, home)]
        for name in dirs + files:
            path = here / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # a temp file that came and went
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                ok = mode == 0o700
            elif path == home / "keys" / "audit-sign.pub":  # a public key, for verifiers
                ok = mode == 0o644
            elif stat.S_ISREG(st.st_mode):
                ok = mode == 0o600
            else:  # sockets: QEMU's (0700 under its umask) and the daemon's (0600)
                ok = mode & 0o077 == 0
            if not ok or st.st_uid != os.getuid():
                bad.append(f"{oct(mode)} uid={st.st_uid} {path}")
    return bad


def test_every_runtime_file_is_root_only(daemon: ServeProcess) -> None:
    home = Paths.from_env().home
    with daemon.client() as http:
        r = http.post("/v1/sandboxes", json={"memory_mib": 128})
        assert r.status_code == 201, r.text
        daemon_vm = r.json()["id"]
        with Sandbox.create(memory_mib=128) as embedded:
            assert embedded.commands.run("echo hi > /dev/null; echo ok").exit_code == 0
            rundirs = {p.name for p in (home / "run" / "vms").iterdir()}
            assert {daemon_vm, embedded.id} <= rundirs
            # What the walk must see, so that it cannot pass by looking at nothing:
            for must in (
                "run/manager.lock",
                "state.db",
                "tokens.db",
                "api-token",
                "tls/server.key",
            ):
                assert (home / must).exists(), must
            for must in ("agent.sock", "qmp.sock", "console.sock", "owner.json", "xfer.img"):
                assert (home / "run" / "vms" / embedded.id / must).exists(), must
            assert any((home / "cache").iterdir()) and any((home / "images").iterdir())
            bad = _bad_modes(home)
        assert bad == [], "readable by others:\n" + "\n".join(bad)
