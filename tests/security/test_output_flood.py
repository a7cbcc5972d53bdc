"""A guest that floods stdout cannot grow the daemon's memory: its output waits in the guest.

The guest writes ``/dev/zero`` to stdout without end, to a client of the real daemon that
reads the status line and then nothing. Flow control (the daemon's bounded exec queue, the
agent client's credit) must stop the guest instead of buffering its output in the daemon.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ServeProcess, serving

pytestmark = pytest.mark.vm

MIB = 1 << 20
RSS_BOUND = 64 * MIB
"""The most the daemon's resident memory may grow while a guest floods a client that does not
read (issue 6: at most 64 MiB above idle; it grew by 257 MB in 15 s before)."""
FORWARD_BOUND = 32 * MIB
"""The most output the daemon may forward to a client that reads nothing: its queue, the
agent client's window and the socket buffers, with a wide margin. Without backpressure it is
the guest's whole rate (about 25 MB/s) times the test's length."""
FLOOD_S = 15.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(tmp_path) as d:
        yield d


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def _forwarded(d: ServeProcess) -> float:
    with d.client() as c:
        text = c.get("/metrics").text
    match = re.search(r'^warden_bytes_total\{direction="exec_stdout"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _start_exec(d: ServeProcess, vm_id: str, cmd: str) -> socket.socket:
    """POST an exec by hand and read only the status line: then read nothing more."""
    body = json.dumps({"cmd": cmd}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # take as little as possible
    sock.connect(str(d.socket))
    sock.sendall(
        f"POST /v1/sandboxes/{vm_id}/exec HTTP/1.1\r\nhost: warden\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = sock.recv(12)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_a_client_that_does_not_read_stops_the_guest_not_the_daemon(
    daemon: ServeProcess,
) -> None:
    pid = daemon.proc.pid if daemon.proc else 0
    with daemon.client() as c:
        vm = c.post("/v1/sandboxes", json={"memory_mib": 256}).json()
        vm_id = vm["id"]
        for _ in range(3):  # warm the exec path up, so the baseline is the daemon at work
            assert c.post(f"/v1/sandboxes/{vm_id}/exec", json={"cmd": "true"}).status_code == 200
    baseline = _rss(pid)
    before = _forwarded(daemon)

    sock = _start_exec(daemon, vm_id, "cat /dev/zero")
    peak = baseline
    try:
        deadline = time.monotonic() + FLOOD_S
        while time.monotonic() < deadline:
            peak = max(peak, _rss(pid))
            time.sleep(0.1)
        forwarded = _forwarded(daemon) - before
    finally:
        sock.close()  # the daemon kills the command

    assert peak - baseline <= RSS_BOUND, (
        f"the daemon grew by {(peak - baseline) / MIB:.0f} MiB (bound {RSS_BOUND // MIB} MiB)"
    )
    assert 0 < forwarded <= FORWARD_BOUND, (
        f"the daemon forwarded {forwarded / MIB:.1f} MiB to a client that read nothing"
    )
    # The flood ends with the connection, and the VM still serves commands.
    with daemon.client() as c:
        find_cat = (  # builtins only: no process named cat of our own
            "sleep 1; for p in /proc/[0-9]*; do read -r c < $p/comm 2>/dev/null; "
            '[ "$c" = cat ] && exit 1; done; echo gone'
        )
        r = c.post(f"/v1/sandboxes/{vm_id}/exec", json={"cmd": find_cat})
        assert r.status_code == 200 and b"gone" in r.content
        c.delete(f"/v1/sandboxes/{vm_id}", params={"force": "true"})
