"""Run the SDK tests in both modes: embedded, and against a `warden serve` daemon.

A test module asks for ``sdk``: either the ``warden`` module itself (embedded) or a
``warden.Client`` connected to a daemon that this module starts (its own socket in a tmp dir,
the shared $WARDEN_HOME, so the built image and boot templates are found). Both have
``Sandbox.create`` and ``AsyncSandbox.create`` making the same classes.

The daemon is module-scoped: one manager may hold $WARDEN_HOME at a time, so it must be gone
before test_daemon.py starts its own.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

import warden

WARDEN = str(Path(sys.executable).parent / "warden")
MODES = ["embedded", "daemon"]


class ServeProcess:
    """A `warden serve` subprocess; stopped by its own pid only."""

    def __init__(
        self, socket: Path, log: Path, args: Sequence[str] = ("--log-level", "warning")
    ) -> None:
        self.socket = socket
        self.log = log
        self.args = list(args)
        self.url = f"unix://{socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://warden",
            timeout=httpx.Timeout(120.0),
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [WARDEN, "serve", "--socket", str(self.socket), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with self.client() as c:
                    if c.get("/v1/info").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the daemon did not answer: {self.log.read_text()}")

    def stop(self) -> None:
        """Remove what is left on the daemon, then SIGTERM it and wait."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                with self.client() as c:
                    for vm in c.get("/v1/sandboxes", params={"all": "true"}).json():
                        c.delete(f"/v1/sandboxes/{vm['id']}", params={"force": "true"})
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=60)
            self.proc = None


@contextlib.contextmanager
def serving(tmp: Path, *args: str) -> Iterator[ServeProcess]:
    """A `warden serve` on a socket in ``tmp`` (extra ``args`` after ``--log-level warning``),
    stopped with what is left on it when the block ends."""
    d = ServeProcess(tmp / "w.sock", tmp / "daemon.log", ("--log-level", "warning", *args))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def warden_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("daemon")) as d:
        yield d


@pytest.fixture(scope="module", params=MODES)
def sdk(request: pytest.FixtureRequest) -> Any:
    """``warden`` (embedded) or a ``warden.Client`` of this module's daemon."""
    if request.param == "embedded":
        return warden
    daemon: ServeProcess = request.getfixturevalue("warden_daemon")
    return warden.connect(daemon.url)


def is_remote(sdk: Any) -> bool:
    return isinstance(sdk, warden.Client)
