"""Local users on the unix socket: who they are is what the kernel says (SO_PEERCRED).

A real `warden serve --group G` (no VM: ``--charge limits``) in a fresh ``$WARDEN_HOME`` under
/tmp (so that the path above it is traversable), and real processes of other users talking to
it. The group is a temporary one made with ``groupadd`` (the daemon resolves ``--group`` by
name, as it does ``warden`` on a real host) and removed afterwards; the users are bare numeric
uids with no passwd entry, switched to with ``setpriv --reuid/--regid/--groups``: nothing to
clean up, and the daemon must then name them ``uid:N``. Their client is /usr/bin/python3 with
the standard library only, so it runs whatever interpreter the venv has.

- a member of the group (supplementary or primary) connects and is seen as itself, role user;
- a user outside it cannot connect (EACCES: the socket's dirs and mode keep it out);
- one who gets through anyway (the modes loosened by hand) is refused (401), never served;
- without the group the socket stays 0600 and its dirs 0700;
- every other file of ``$WARDEN_HOME`` stays private.

That such a user sees and acts on only their own sandboxes: test_peer_policy.py.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import WARDEN

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("setpriv", "groupadd", "groupdel")),
    reason="needs root, setpriv and groupadd",
)

SYSTEM_PYTHON = "/usr/bin/python3"

CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
    sys.exit(0)
s.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: warden\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(body)}))
"""


def _free_uids(count: int) -> list[int]:
    """Numeric uids with no passwd entry (and so no group of that number either)."""
    found: list[int] = []
    for uid in range(61000 + secrets.randbelow(3000), 65000):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            found.append(uid)
        if len(found) == count:
            return found
    raise AssertionError("no free uids")


@dataclass
class Daemon:
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def socket(self) -> Path:
        return self.home / "api" / "warden.sock"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def _serve(home: Path, *args: str) -> Daemon:
    log = home.parent / f"{home.name}.log"
    env = {**os.environ, "WARDEN_HOME": str(home)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [WARDEN, "serve", "--charge", "limits", "--log-level", "info", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    daemon = Daemon(home, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            transport = httpx.HTTPTransport(uds=str(daemon.socket))
            with httpx.Client(transport=transport, base_url="http://warden") as c:
                if c.get("/v1/whoami").status_code == 200:
                    return daemon
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    daemon.stop()
    raise AssertionError(f"the daemon did not answer: {log.read_text()}")


@dataclass
class Setup:
    daemon: Daemon
    group: str
    gid: int
    member: int
    outsider: int


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    group = f"wdnt{secrets.token_hex(3)}"
    subprocess.run(["groupadd", "--system", group], check=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="warden-peer-", dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - the test's dir: only the daemon's modes below count
    try:
        gid = grp.getgrnam(group).gr_gid
        member, outsider = _free_uids(2)
        daemon = _serve(base / "home", "--group", group)
        try:
            yield Setup(daemon, group, gid, member, outsider)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["groupdel", group], check=False, timeout=60)


def _as(uid: int, gid: int, groups: list[int], socket: Path) -> dict[str, object]:
    """Run the client as ``uid:gid`` with supplementary ``groups``: what it got."""
    ids = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    p = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", *ids, SYSTEM_PYTHON, "-c", CLIENT,
         str(socket)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def _mode(path: Path) -> tuple[str, int]:
    st = path.stat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_gid


def test_the_socket_is_the_groups_and_nothing_else_is(setup: Setup) -> None:
    home = setup.daemon.home
    assert _mode(home) == ("0o710", setup.gid)  # pass through, not list
    assert _mode(home / "api") == ("0o750", setup.gid)
    assert _mode(setup.daemon.socket) == ("0o660", setup.gid)
    assert sorted(p.name for p in (home / "api").iterdir()) == ["warden.sock"]
    for path in home.iterdir():
        if path.name == "api":
            continue
        want = "0o700" if path.is_dir() else "0o600"
        assert oct(stat.S_IMODE(path.stat().st_mode)) == want, path


def test_a_member_is_seen_as_itself(setup: Setup) -> None:
    uid = setup.member
    got = _as(uid, uid, [setup.gid], setup.daemon.socket)
    assert got == {
        "status": 200,
        "body": {"name": f"uid:{uid}", "roles": ["user"], "via": "unix", "uid": uid,
                 "token_id": None},
    }  # fmt: skip


def test_a_member_by_its_primary_group_too(setup: Setup) -> None:
    got = _as(setup.member, setup.gid, [], setup.daemon.socket)
    assert got["status"] == 200 and got["body"] == {
        "name": f"uid:{setup.member}", "roles": ["user"], "via": "unix", "uid": setup.member,
        "token_id": None,
    }  # fmt: skip


def test_a_user_outside_the_group_cannot_connect(setup: Setup) -> None:
    got = _as(setup.outsider, setup.outsider, [], setup.daemon.socket)
    assert got == {"errno": errno.EACCES}
    # Nor by claiming a group it is not in: the kernel, not the client, says which it has.
    got = _as(setup.outsider, setup.outsider, [setup.outsider + 1], setup.daemon.socket)
    assert got == {"errno": errno.EACCES}


def test_the_cli_runs_as_a_member(setup: Setup) -> None:
    """`make venv` builds the venv on an interpreter every user can execute."""
    uid = setup.member
    ids = [f"--reuid={uid}", f"--regid={uid}", f"--groups={setup.gid}"]
    probe = subprocess.run(["setpriv", *ids, WARDEN, "--help"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("this venv's interpreter is not executable by others: run `make venv`")
    env = {**os.environ, "WARDEN_HOME": str(setup.daemon.home)}
    env.pop("WARDEN_HOST", None)
    p = subprocess.run(
        ["setpriv", *ids, WARDEN, "ps", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_one_who_gets_through_anyway_is_refused(setup: Setup) -> None:
    """Loosen the modes by hand (a mistake of an admin): the daemon still serves no one
    without a role."""
    home, sock = setup.daemon.home, setup.daemon.socket
    before = [(p, stat.S_IMODE(p.stat().st_mode)) for p in (home, home / "api", sock)]
    try:
        os.chmod(home, 0o711)  # noqa: S103 - the mistake this test makes on purpose
        os.chmod(home / "api", 0o755)  # noqa: S103
        os.chmod(sock, 0o666)  # noqa: S103
        got = _as(setup.outsider, setup.outsider, [], sock)
    finally:
        for path, mode in before:
            os.chmod(path, mode)
    assert got["status"] == 401, got
    body = got["body"]
    assert isinstance(body, dict) and body["error"]["type"] == "AuthenticationError"
    message = body["error"]["message"]
    assert f"uid:{setup.outsider}" in message and "no role" in message


def test_without_the_group_the_socket_stays_private(setup: Setup) -> None:
    base = setup.daemon.home.parent
    daemon = _serve(base / "private-home", "--group", f"{setup.group}-none")
    try:
        assert _mode(daemon.home)[0] == "0o700"
        assert _mode(daemon.home / "api")[0] == "0o700"
        assert _mode(daemon.socket)[0] == "0o600"
        # Even a member of the (other) group cannot reach it.
        got = _as(setup.member, setup.member, [setup.gid], daemon.socket)
        assert got == {"errno": errno.EACCES}
    finally:
        daemon.stop()
