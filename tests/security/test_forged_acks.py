"""Forged transfer-window acknowledgements from a root workload: a real VM (embedded SDK).

A workload granted root owns its guest: it copies the agent's virtio-serial port out of PID 1
(pidfd_open + pidfd_getfd through ctypes) and writes XFER DATA frames of its own on it,
acknowledging slots of the transfer window that were never outstanding (one at 1 TiB, as in
the report of issue 6). Since the agent channel is encrypted (issue 7), such frames are not
even records to the host: they fail authentication, which ends the session with a
ChannelAuthError naming the VM, before anything reaches the window file. The window file must
be byte-identical afterwards; the manager opens a new session (which ends the forger's
command), and the VM must still stop and go away. (tests/unit/test_client_hostile.py checks
the acknowledgement rules themselves, inside an authenticated session.)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import warden
from warden._errors import ChannelAuthError, WardenError
from warden.config import Paths

pytestmark = pytest.mark.vm

# Runs as root in the guest. It prints nothing before its frames are out, so the agent (which
# pumps this process's output) writes nothing on the port meanwhile to interleave with them.
FORGE = r"""
import ctypes, os, sys, time
sys.path.insert(0, "/usr/lib/warden")
from warden.wire.frame import Channel, Frame, FrameType, encode, encode_xfer_ref

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def port_fd():
    for name in os.listdir("/proc/1/fd"):
        try:
            if os.readlink(f"/proc/1/fd/{name}").startswith("/dev/vport"):
                return int(name)
        except OSError:
            pass
    sys.exit("no virtio port among the agent's fds")

target = port_fd()
pidfd = libc.syscall(434, 1, 0)  # pidfd_open(1, 0)
if pidfd < 0:
    sys.exit(f"pidfd_open: errno {ctypes.get_errno()}")
port = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd(pidfd, target, 0)
if port < 0:
    sys.exit(f"pidfd_getfd: errno {ctypes.get_errno()}")
frames = b"".join(
    encode(Frame(FrameType.DATA, rid, Channel.XFER, encode_xfer_ref(offset, 1 << 20)))
    for rid in (1, 2, 3, 7, 1000)
    for offset in (1 << 40, 0, 1 << 20, 15 << 20)
)
os.write(port, frames)
time.sleep(120)  # the host ends the session long before this
"""


@pytest.fixture
def sandbox(no_leaks: None) -> Iterator[warden.Sandbox]:
    sb = warden.Sandbox.create(timeout=180)
    try:
        yield sb
    finally:
        sb.kill()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_forged_acknowledgements_are_rejected(sandbox: warden.Sandbox) -> None:
    window = Paths.from_env().vms / sandbox.id / "xfer.img"
    # A genuine write through the window first, so that the file holds data to compare.
    payload = bytes(range(256)) * (3 << 12)  # 3 MiB: three window slots
    assert sandbox.files.write("/home/user/genuine.bin", payload) == len(payload)
    assert sandbox.files.read("/home/user/genuine.bin", format="bytes") == payload
    before = sha256(window)
    assert before != hashlib.sha256(bytes(window.stat().st_size)).hexdigest()  # not all zeros

    start = time.monotonic()
    with pytest.raises(ChannelAuthError) as caught:
        sandbox.commands.run(["python3", "-c", FORGE], user="root", timeout=150)
    message = str(caught.value)
    assert "failed" in message and sandbox.id in message, message
    assert time.monotonic() - start < 60  # rejected at once, not by a timeout
    assert sha256(window) == before  # the forged references never reached the window file

    deadline = time.monotonic() + 60  # a new session serves the next request
    while True:
        try:
            result = sandbox.commands.run("pgrep -f 'time.sleep.120' || echo gone", timeout=30)
            break
        except WardenError:
            assert time.monotonic() < deadline, "no new session"
            time.sleep(0.2)
    assert result.stdout == "gone\n", "the forger outlived its session"
    assert sha256(window) == before
    sandbox.kill()
    assert not window.parent.exists()
