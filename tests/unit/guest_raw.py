"""A raw host for the guest agent: the agent on a socketpair, driven frame by frame.

For tests of the wire behaviour itself (session versions, WINDOW credit, the ``user`` key),
without the host client in between. No VM: the agent runs on the host (``--fd``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warden.wire.frame import (
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    decode_json,
    encode_json,
    encode_window,
)

AGENT = [sys.executable, "-m", "warden.guest"]


class RawHost:
    """One end of a socketpair; the agent serves the other."""

    def __init__(self, log: Path, user_home: Path, argv: list[str] | None = None) -> None:
        self.sock, child = socket.socketpair()
        self.log = log
        with open(log, "wb") as log_file:
            self.proc = subprocess.Popen(
                [*(argv or AGENT), "--fd", str(child.fileno()), "--user-home", str(user_home)],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        child.close()
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, versions: list[int]) -> dict[str, Any]:
        self.send(encode_json(FrameType.HELLO, 0, {"versions": versions, "nonce": "n"}))
        reply = self.recv()
        assert reply.type == FrameType.HELLO, reply
        return decode_json(reply)

    def request(self, rid: int, args: dict[str, Any]) -> None:
        self.send(encode_json(FrameType.REQUEST, rid, args))

    def window(self, rid: int, channel: Channel, increment: int) -> None:
        self.send(encode_window(rid, channel, increment))

    def recv(self, timeout: float = 20.0) -> Frame:
        """The next frame; raises TimeoutError if none comes within ``timeout`` s."""
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the agent closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def response(self, rid: int, timeout: float = 20.0) -> tuple[dict[str, bytes], dict[str, Any]]:
        """Collect request ``rid``'s streams (by channel name) until its RESPONSE."""
        streams: dict[str, bytes] = {}
        while True:
            frame = self.recv(timeout)
            assert frame.request_id == rid, frame
            if frame.type == FrameType.RESPONSE:
                return streams, decode_json(frame)
            if frame.type == FrameType.DATA:
                name = frame.channel.name.lower()
                streams[name] = streams.get(name, b"") + frame.payload

    def close(self) -> int:
        """Close the connection; the agent's exit status."""
        self.sock.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def pipe_blocked(pid: int) -> bool:
    """Whether process ``pid`` sleeps in a write to a full pipe."""
    try:
        with open(f"/proc/{pid}/wchan", encoding="ascii") as f:
            return "pipe" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def user_home() -> Iterator[Path]:
    """A home for the guest's user that uid 1000 can reach (pytest's tmp_path is root's, 0700).

    The agent checks a command's cwd as the user, so the user must be able to reach it."""
    base = Path(tempfile.mkdtemp(prefix="warden-guest-test-"))
    try:
        base.chmod(0o755)
        yield user_dir(base / "home")
    finally:
        shutil.rmtree(base)


def user_dir(path: Path) -> Path:
    """Make ``path`` a dir owned by the guest user (uid 1000), when the test runs as root."""
    path.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 1000, 1000)
    return path
