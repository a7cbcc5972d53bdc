"""Links through a real `warden serve`: the SDK's ``sbx.links``, the CLI, the API's errors and
the audit log. Real VMs under TCG."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import warden
from tests.integration.conftest import WARDEN, ServeProcess, serving
from warden.audit import records
from warden.config import Paths

pytestmark = pytest.mark.vm

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/warden/links/" + sys.argv[1] + ".sock")
s.sendall(sys.argv[2].encode())
s.shutdown(socket.SHUT_WR)
print(s.recv(1000).decode())
"""
ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/warden/links/" + sys.argv[1] + ".sock")
data = b""
while d := s.recv(1000):
    data += d
s.sendall(data.upper())
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("links-daemon")) as d:
        yield d


def cli(daemon: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WARDEN, *args, "--host", daemon.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sdk_and_cli_link_two_sandboxes_and_audit_it(daemon: ServeProcess) -> None:
    client = warden.connect(daemon.url)
    started = time.time()
    with client.Sandbox.create() as a, client.Sandbox.create() as b:
        made = a.links.create(b, "pipe")
        assert (made["name"], made["a"], made["b"], made["path"]) == ("pipe", a.id, b.id, "ring")
        assert [x["name"] for x in b.links.list()] == ["pipe"]
        listed = cli(daemon, "link", "ls", "--json")
        assert listed.returncode == 0 and '"pipe"' in listed.stdout, listed.stderr
        echoed: list[str] = []
        t = threading.Thread(
            target=lambda: echoed.append(b.commands.run(["python3", "-c", ECHO, "pipe"]).stdout)
        )
        t.start()
        sent = a.commands.run(["python3", "-c", SEND, "pipe", "hello over the link"])
        t.join()
        assert sent.stdout.strip() == "HELLO OVER THE LINK", sent
        # The stream ended both ways: the link is gone.
        for _ in range(100):
            if not client.links():
                break
            time.sleep(0.05)
        assert client.links() == []
        with pytest.raises(warden.LinkNotFoundError):
            a.links.remove("pipe")

        created = cli(daemon, "link", "create", a.id, b.id, "--name", "viacli")
        assert created.returncode == 0, created.stderr
        assert "viacli" in created.stdout
        dup = cli(daemon, "link", "create", a.id, b.id, "--name", "viacli")
        assert dup.returncode == 125 and "exists" in dup.stderr
        with pytest.raises(warden.LinkError, match="two different"):
            client.create_link(a.id, a.id, "self")
        removed = cli(daemon, "link", "rm", "viacli")
        assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
        missing = cli(daemon, "link", "rm", "viacli")
        assert missing.returncode == 125 and "no link" in missing.stderr
    home = Paths.from_env().home
    found = [r for r in records(home, since=started) if r["action"].startswith("link-")]
    summary = [(r["action"], r["outcome"], r.get("link"), r["sandbox"]) for r in found]
    assert summary == [
        ("link-create", "ok", "pipe", a.id),
        ("link-rm", "error", "pipe", None),
        ("link-create", "ok", "viacli", a.id),
        ("link-create", "error", "viacli", a.id),
        ("link-create", "error", "self", a.id),
        ("link-rm", "ok", "viacli", a.id),
        ("link-rm", "error", "viacli", None),
    ], summary
    assert found[0]["peer"] == b.id


def test_an_embedded_sandbox_says_links_need_the_daemon(tmp_path: Path) -> None:
    del tmp_path
    with warden.Sandbox.create() as a, pytest.raises(warden.LinkError, match="need the daemon"):
        a.links.create("other", "x")
