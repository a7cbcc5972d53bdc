"""Attacks on links: what the relaying host sees and can do, and who else can reach a link.

Real VMs under TCG and the daemon's Manager in process. The host's relay is the attacker here:
the tests wrap :meth:`warden.agent.link.LinkEnd.send` (what the daemon sends an end) to
capture or alter the records it carries (so these links are made with ``transport="relay"``;
the ring's region is tests/security/test_links_ring.py and tests/security/test_ring_hostile.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.integration.test_links import (
    HOLD,
    Pair,
    client,
    ended_in_error,
    sandboxes,
    two_sandboxes,
    wait_for_socket,
)
from warden import audit
from warden.agent.link import LinkEnd
from warden.auth.principal import SCOPE_KEY, Principal
from warden.config import Paths
from warden.server.app import create_app
from warden.store.db import DAEMON_OWNER
from warden.vmm.machine import Machine

pytestmark = pytest.mark.vm

MARKER = "PLAINTEXT-MARKER-0123456789"


@pytest.fixture
async def trio(no_leaks: None) -> AsyncIterator[tuple[Pair, str]]:
    """Two linked-to-be sandboxes and a third one."""
    async with sandboxes((DAEMON_OWNER,) * 3) as (manager, (a, b, c)):
        yield Pair(manager, a, b), c.id


CHAT = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    while True:
        s.sendall(b"ping")
        if not s.recv(100):
            s.sendall(b"after eof")
            time.sleep(0.2)
            s.sendall(b"after eof")
            print("no-error")
            break
        time.sleep(0.05)
except OSError as exc:
    print("error", errno.errorcode.get(exc.errno, exc.errno))
"""


async def chat(machine: Machine, name: str) -> str:
    argv = ["python3", "-c", CHAT, f"/run/warden/links/{name}.sock"]
    result = await machine.agent.exec(argv, timeout=120)
    return result.stdout.decode() + result.stderr.decode()


async def read_error(machine: Machine, name: str) -> str:
    result = await machine.agent.exec(["cat", f"/run/warden/links/{name}.error"])
    return result.stdout.decode()


async def links_gone(pair: Pair) -> None:
    for _ in range(100):
        if not pair.manager.links.list():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"links left: {pair.manager.links.list()}")


SEND_MARKER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() * 4096)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
"""
READ_ALL = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.shutdown(socket.SHUT_WR)
data = b""
while d := s.recv(65536):
    data += d
print(data.count(sys.argv[2].encode()))
"""


async def test_the_host_relays_ciphertext_only(
    trio: tuple[Pair, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, _ = trio
    relayed: list[bytes] = []
    real_send = LinkEnd.send

    async def capture(self: LinkEnd, record: bytes) -> None:
        relayed.append(record)
        await real_send(self, record)

    monkeypatch.setattr(LinkEnd, "send", capture)
    await pair.manager.links.create(pair.a.id, pair.b.id, "ct", transport="relay")
    path = "/run/warden/links/ct.sock"
    sender = pair.a.agent.exec(["python3", "-c", SEND_MARKER, path, MARKER], timeout=120)
    reader = pair.b.agent.exec(["python3", "-c", READ_ALL, path, MARKER], timeout=120)
    sent, got = await asyncio.gather(sender, reader)
    assert sent.exit_code == 0, sent.stderr
    assert got.stdout.strip() == b"4096", got.stdout + got.stderr  # it arrived whole
    everything = b"".join(relayed)
    assert len(everything) >= 4096 * len(MARKER)
    assert MARKER.encode() not in everything
    assert MARKER[:8].encode() not in everything


async def test_a_tampered_record_closes_the_link_on_both_ends(
    trio: tuple[Pair, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, _ = trio
    real_send = LinkEnd.send

    armed = False

    async def tamper(self: LinkEnd, record: bytes) -> None:
        if armed:
            flipped = bytearray(record)
            flipped[0] ^= 1
            record = bytes(flipped)
        await real_send(self, record)

    monkeypatch.setattr(LinkEnd, "send", tamper)
    await pair.manager.links.create(pair.a.id, pair.b.id, "tamper", transport="relay")
    chats = [chat(pair.a, "tamper"), chat(pair.b, "tamper")]
    tasks = [asyncio.create_task(c) for c in chats]
    await wait_for_socket(pair.a, "tamper", present=False)  # both clients are talking
    await wait_for_socket(pair.b, "tamper", present=False)
    armed = True
    out_a, out_b = await asyncio.gather(*tasks)
    assert ended_in_error(out_a), out_a
    assert ended_in_error(out_b), out_b
    await links_gone(pair)
    errors = [await read_error(m, "tamper") for m in (pair.a, pair.b)]
    assert any("failed authentication" in e for e in errors), errors
    assert all(errors), errors


async def test_a_forged_end_of_stream_is_refused(
    trio: tuple[Pair, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay cannot cut a direction short with an END record of its own making."""
    pair, _ = trio
    real_send = LinkEnd.send

    async def truncate(self: LinkEnd, record: bytes) -> None:
        await real_send(self, bytes(16))  # the size of an END record, not sealed by the end

    monkeypatch.setattr(LinkEnd, "send", truncate)
    await pair.manager.links.create(pair.a.id, pair.b.id, "cut", transport="relay")
    ra, rb = await asyncio.gather(client(pair.a, "cut", 1000, "A"), client(pair.b, "cut", 0, "B"))
    # B got no data and no authenticated end: an error (NAME.error), not an empty stream.
    assert rb["got_n"] == 0 and ra["got_n"] == 0
    await links_gone(pair)
    assert "failed authentication" in await read_error(pair.b, "cut")
    assert await read_error(pair.a, "cut")  # closed with an error too (its peer's END was forged)


async def test_a_third_vm_has_no_socket_for_the_link(trio: tuple[Pair, str]) -> None:
    pair, third_id = trio
    third = await pair.manager.machine(third_id)
    await pair.manager.links.create(pair.a.id, pair.b.id, "private")
    await wait_for_socket(pair.a, "private")
    await wait_for_socket(pair.b, "private")
    result = await third.agent.exec(["ls", "-A", "/run/warden/links"])
    assert b"private" not in result.stdout
    probe = await third.agent.exec(
        ["python3", "-c", HOLD, "/run/warden/links/private.sock"], timeout=60
    )
    assert probe.exit_code != 0 and b"FileNotFoundError" in probe.stderr
    await pair.manager.links.remove("private")


async def test_the_link_key_is_never_logged_nor_written(
    trio: tuple[Pair, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key goes to the two agents inside their channels only: not in the daemon's log,
    the audit log, a console, or any file of the daemon's home."""
    import logging
    import secrets

    pair, _ = trio
    key = bytes.fromhex("5eed" * 16)
    monkeypatch.setattr(secrets, "token_bytes", lambda n: key[:n])
    caplog.set_level(logging.DEBUG)
    await pair.manager.links.create(pair.a.id, pair.b.id, "secret")
    ra, rb = await asyncio.gather(
        client(pair.a, "secret", 1000, "A"), client(pair.b, "secret", 1000, "B")
    )
    assert ra["got_n"] == rb["got_n"] == 1000
    await links_gone(pair)
    needles = (key, key.hex().encode(), key.hex().upper().encode())
    assert not any(n.decode(errors="replace") in caplog.text for n in needles)
    assert not any(n.decode(errors="replace") in pair.a.console_tail(400) for n in needles)
    assert not any(n.decode(errors="replace") in pair.b.console_tail(400) for n in needles)
    home = Paths.from_env().home
    for path in [*home.joinpath("audit").rglob("*"), *home.joinpath("vms").rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < (64 << 20):
            try:
                data = path.read_bytes()
            except OSError:
                continue  # a socket, or a file QEMU holds exclusively
            assert not any(n in data for n in needles), path


class As:
    """Every request is ``principal``'s (what the authenticating middleware decides, fixed);
    None: the app's default, the local admin."""

    def __init__(self, app: ASGIApp, principal: Principal | None) -> None:
        self.app, self.principal = app, principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.principal is not None:
            scope = {**scope, SCOPE_KEY: self.principal}
        await self.app(scope, receive, send)


@pytest.fixture
async def owned(no_leaks: None) -> AsyncIterator[Pair]:
    """Alice's sandbox and Bob's (the shipped policy: a user may link only their own)."""
    async with two_sandboxes(("alice", "bob")) as pair:
        yield pair


async def test_removing_a_link_needs_link_on_both_sandboxes(owned: Pair) -> None:
    """``DELETE /v1/links/{name}`` of an open link, by callers who lack ``link`` on one end
    (alice, bob: each owns one) or on both (mallory): refused, audited, the link still open.
    An end the caller may not see is concealed (404, as if absent); the admin removes it."""
    since = time.time()
    a, b = owned.a.id, owned.b.id
    await owned.manager.links.create(a, b, "theirs")
    app = create_app(owned.manager, manage_lifespan=False)
    refused = {"alice": b, "bob": a, "mallory": a}  # the end each is refused on, first
    for name, end in refused.items():
        who = Principal(name, frozenset({"user"}), via="unix", uid=1000)
        transport = httpx.ASGITransport(app=As(app, who))
        async with httpx.AsyncClient(transport=transport, base_url="http://warden") as c:
            r = await c.delete("/v1/links/theirs")
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"]["type"] == "VMNotFoundError" and end in r.text, (name, r.text)
        assert [i.name for i in owned.manager.links.list()] == ["theirs"], name
    await wait_for_socket(owned.a, "theirs")  # both ends are still there
    await wait_for_socket(owned.b, "theirs")
    denied = [
        r
        for r in audit.records(Paths.from_env().home, action="link", since=since)
        if r["outcome"] == "denied"
    ]
    assert {(r["principal"], r["sandbox"]) for r in denied} == set(refused.items())
    transport = httpx.ASGITransport(app=As(app, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://warden") as c:
        r = await c.delete("/v1/links/theirs")
    assert r.status_code == 200 and r.json()["name"] == "theirs", r.text
    assert owned.manager.links.list() == []
