"""The real guest agent on the host, with a channel secret (``--secret-file``), driven by the
real AgentClient through the encrypted channel. No VM: the agent serves a socketpair end.
Real VMs are in tests/security/test_channel.py."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_local import AGENT, _check_exit, owned_by_user, run, user_tmp
from warden._errors import AgentTimeoutError, ChannelAuthError
from warden.agent.client import AgentClient
from warden.channel.transport import HANDSHAKE_SIZE, Initiator

LENGTH = struct.Struct(">I")
__all__ = ["user_tmp"]  # a fixture, imported for pytest


class SecretAgent:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, secret: bytes) -> None:
        self.proc = proc
        self.sock = sock
        self.secret = secret

    async def client(self, secret: bytes | None = None, **kwargs: object) -> AgentClient:
        # A dup per client: closing one does not end the stream (the agent serves one fd).
        reader, writer = await asyncio.open_connection(sock=self.sock.dup(), limit=1 << 20)
        return await AgentClient.from_streams(
            reader,
            writer,
            timeout=kwargs.pop("timeout", 10),  # type: ignore[arg-type]
            secret=self.secret if secret is None else secret,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def agent(tmp_path: Path, user_tmp: Path) -> Iterator[SecretAgent]:
    secret = os.urandom(32)
    key = tmp_path / "key"
    key.write_bytes(secret)
    key.chmod(0o600)
    home = user_tmp / "home"
    home.mkdir(mode=0o700)
    owned_by_user(home)
    parent, child = socket.socketpair()
    log = tmp_path / "agent.log"
    argv = [*AGENT, "--fd", str(child.fileno()), "--secret-file", str(key)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*argv, "--user-home", str(home)],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    child.close()
    try:
        yield SecretAgent(proc, parent, secret)
    finally:
        parent.close()
        _check_exit(proc, log, expect_clean=True)


def test_requests_run_through_the_channel_and_nothing_is_plaintext(agent: SecretAgent) -> None:
    async def main() -> None:
        client = await agent.client()
        result = await client.exec(["echo", "secret-marker"])
        assert result.stdout == b"secret-marker\n"
        await client.close()

    run(main())


def test_a_plaintext_host_gets_no_answer(agent: SecretAgent) -> None:
    """An agent with a secret speaks only the channel: a plaintext HELLO is never answered."""

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=agent.sock.dup())
        with pytest.raises(AgentTimeoutError, match="HELLO"):
            await AgentClient.from_streams(reader, writer, timeout=1.0)
        client = await agent.client()
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        await client.close()

    run(main())


def test_a_wrong_secret_is_refused_and_the_right_one_still_works(agent: SecretAgent) -> None:
    async def main() -> None:
        with pytest.raises(ChannelAuthError, match="different secrets"):
            await agent.client(secret=os.urandom(32))
        client = await agent.client()
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        await client.close()

    run(main())


def test_a_tampered_record_ends_the_session_and_a_new_one_works(
    agent: SecretAgent, user_tmp: Path
) -> None:
    """The host's record is altered on the way: the agent refuses it, runs nothing of it, and
    tells the host; the next session works."""
    marker = user_tmp / "home" / "marker"

    async def main() -> None:
        # A raw host: handshake by hand, then a record with one flipped bit.
        initiator = Initiator(agent.secret)
        agent.sock.sendall(initiator.data_to_send())
        session = None
        while session is None:
            session = initiator.receive(await asyncio.to_thread(agent.sock.recv, 4096))
        from warden.wire.frame import SESSION_VERSION, FrameType, encode_json

        hello = encode_json(FrameType.HELLO, 0, {"versions": [SESSION_VERSION], "nonce": "n"})
        request = encode_json(FrameType.REQUEST, 1, {"op": "exec", "argv": ["touch", str(marker)]})
        sealed = bytearray(session.seal(hello) + session.seal(request))
        sealed[-5] ^= 0x01  # in the exec's record
        agent.sock.sendall(bytes(sealed))
        reply = b""
        while b"WDNC" not in reply:  # the HELLO's answer, then the abort notice
            reply += await asyncio.to_thread(agent.sock.recv, 65536)
        with pytest.raises(Exception, match="record"):
            session.feed(reply)
        assert describe(session.unread)
        client = await agent.client()
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        await client.close()
        assert not marker.exists(), "the tampered request ran"

    run(main())


def describe(unread: bytes) -> bool:
    from warden.channel.transport import describe_abort

    return describe_abort(unread) is not None


def test_a_new_host_takes_over_a_stream_left_mid_record(agent: SecretAgent) -> None:
    """A manager killed mid-record, and the next one connecting before the agent saw an EOF:
    the new host pads (AgentClient(resync=True)) and its handshake is found after it."""

    async def main() -> None:
        old = await agent.client()
        task = asyncio.create_task(old.exec(["sh", "-c", "exec sleep 30"]))
        await asyncio.sleep(0.3)
        big = old._sealed(bytes(50_000))  # a record the agent is in the middle of
        assert old._reader_task is not None and old._watchdog_task is not None
        # The old host is dead: it reads nothing of the new session and writes nothing more.
        # Its own connection (a dup of the socket) is cut, so the agent sees no EOF, and
        # nothing the old client would still send on its way down (the cancel of its exec,
        # a watchdog ping, sealed with the old keys) reaches the new session: a dead host sends
        # nothing, and a live one that did would end the new session, as it should (a CI run
        # saw that race when the old client was only stopped reading).
        old._watchdog_task.cancel()
        old._writer.transport.abort()
        old._reader_task.cancel()
        agent.sock.sendall(big[:20_000])
        new = await agent.client(resync=True)
        assert (await new.exec(["echo", "mine"])).stdout == b"mine\n"
        await new.close()
        await old.close()
        with pytest.raises(Exception, match=r"closed|connection"):
            await task  # the old session's command went with it

    run(main())


def test_handshake_messages_are_the_documented_size() -> None:
    assert len(Initiator(os.urandom(32)).data_to_send()) == HANDSHAKE_SIZE == 54


def test_an_agent_without_the_channel_gets_a_clear_error(tmp_path: Path, user_tmp: Path) -> None:
    """An agent that does not speak the channel (as one of an image built before it) never
    answers the handshake: the host's timeout says to rebuild the image."""
    parent, child = socket.socketpair()
    argv = [*AGENT, "--fd", str(child.fileno()), "--user-home", str(user_tmp)]
    log = tmp_path / "agent.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stderr=log_file
        )
    child.close()

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=parent)
        with pytest.raises(AgentTimeoutError, match=r"channel handshake.*rebuild the image"):
            await AgentClient.from_streams(reader, writer, timeout=1.0, secret=os.urandom(32))

    try:
        run(main())
        _check_exit(proc, log, expect_clean=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
