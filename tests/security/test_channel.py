"""The encrypted agent channel against an attacker on the host side of the port: real VMs.

Someone who can reach the unix socket QEMU serves for a VM's agent port (``run.agent``) sits
between the host and the guest agent. The tests close the Machine's own connection and put
:class:`tests.security.mitm.Mitm` there: it relays a test AgentClient (holding the VM's secret)
to the socket and, on command, alters one record of the channel (flips a bit, replays an
earlier record, swaps two, truncates one, cuts the stream inside one, or injects one withheld
from another session). Each time, the attacked session must fail (the guest ends it with an
abort notice that the client reports as ChannelAuthError), the request in the attacked record
must not have run (its marker file does not exist), and a new session straight to the socket
must work. A wrong secret and a plaintext client are refused. Clones of one boot template
get secrets of their own, and the template's secret opens neither.

One VM serves the module (its own memory size, so that the boot template of that shape is
this module's); the clone test makes two clones of that template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import warden
from tests.conftest import qemu_pids
from tests.security.mitm import Attack, Direction, Mitm
from warden._errors import AgentTimeoutError, ChannelAuthError, WardenError
from warden.agent.client import AgentClient
from warden.channel.transport import HANDSHAKE_HEADER_SIZE, MAGIC, Initiator, abort_notice
from warden.config import Paths
from warden.sdk import _portal
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.machine import Machine
from warden.wire.frame import SESSION_VERSION, FrameType, encode_json
from warden.wire.ops import Key, Op

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

MEMORY = 232
"""A memory size no other test uses: the boot template of this shape is ours."""
CONNECT_S = 30.0
"""How long a session may take to set up (a loaded 2-core host, TCG)."""
SILENCE_S = 5.0
"""How long a refused client waits for an answer that must not come."""
GUEST_ENDED = "the guest agent ended the session"
"""What the client says when the guest's abort notice arrives (warden.channel.transport)."""


def _machine(sbx: warden.Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def _release_agent(machine: Machine) -> None:
    """Close the Machine's own agent connection: QEMU serves one client at a time."""
    agent = machine._agent
    assert agent is not None
    _portal.call(agent.close())


def _secret(machine: Machine) -> bytes:
    """The VM's current channel secret, from the key store (and the one the Machine holds)."""
    secret = ChannelKeys(Paths.from_env()).current(machine.id)
    assert secret is not None and len(secret) == 32
    assert secret == machine._secret
    return secret


@pytest.fixture(scope="module")
def vm() -> Iterator[Machine]:
    """One VM for the module, its agent connection closed: the tests make their own."""
    before = qemu_pids()
    with warden.Sandbox.create(memory_mib=MEMORY, timeout=180) as sbx:
        machine = _machine(sbx)
        _release_agent(machine)
        yield machine
    assert qemu_pids() - before == set(), "a QEMU process was left running"


@pytest.fixture
def secret(vm: Machine) -> bytes:
    return _secret(vm)


@contextlib.asynccontextmanager
async def _session_via(mitm: Mitm, machine: Machine, secret: bytes) -> AsyncIterator[AgentClient]:
    """A session through the man in the middle ``mitm``."""
    async with mitm.client_streams() as (reader, writer):
        client = await AgentClient.from_streams(
            reader, writer, timeout=CONNECT_S, secret=secret, name=machine.id
        )
        try:
            yield client
        finally:
            await client.close()


async def _connect(
    machine: Machine, secret: bytes | None, timeout: float = CONNECT_S, *, resync: bool = False
) -> AgentClient:
    """A session straight to the agent socket (``resync``: as warden takes over a VM whose
    earlier host vanished, padding first; see ``warden.agent.secure``)."""
    return await AgentClient.connect_unix(
        machine.run.agent, timeout=timeout, secret=secret, name=machine.id, resync=resync
    )


async def _assert_usable(
    machine: Machine, secret: bytes, *absent: str, resync: bool = False
) -> None:
    """A new session straight to the socket works, and none of ``absent`` exists in the guest
    (the tampered requests never ran)."""
    client = await _connect(machine, secret, resync=resync)
    try:
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        for path in absent:
            result = await client.exec(["test", "-e", path])
            assert result.exit_code == 1, f"{path} exists: a tampered request ran"
    finally:
        await client.close()


def _marker(tag: str) -> str:
    return f"/tmp/channel-{tag}-{uuid.uuid4().hex[:12]}"


def _touch(path: str) -> list[str]:
    return ["sh", "-c", f"touch {path}"]


async def _read_for(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything that arrives within ``seconds`` (or until the stream ends)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    data = bytearray()
    while (left := deadline - loop.time()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), left)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _assert_guest_ended(error: BaseException, mitm: Mitm) -> None:
    """The guest refused a record of ours: it sent its abort notice and the client said so."""
    assert isinstance(error, ChannelAuthError), repr(error)
    assert GUEST_ENDED in str(error), str(error)
    assert any(n.startswith(abort_notice()) for n in mitm.notices), mitm.notices


# -- a man in the middle, host -> guest ---------------------------------------------------


async def test_a_flipped_bit_in_a_host_record_is_refused(vm: Machine, secret: bytes) -> None:
    """Bit flip, host -> guest: one bit of an exec request's ciphertext is flipped on the way.
    The guest must refuse the record (and not run the command), end the session and say so."""
    marker = _marker("flip")
    mitm = Mitm(vm.run.agent)
    async with _session_via(mitm, vm, secret) as client:
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"  # the relay works
        mitm.arm(Direction.HOST_TO_GUEST, Attack.FLIP)
        with pytest.raises(ChannelAuthError) as caught:
            await client.exec(_touch(marker))
    assert mitm.fired == [Attack.FLIP]
    _assert_guest_ended(caught.value, mitm)
    await _assert_usable(vm, secret, marker)


async def test_a_replayed_host_record_is_refused(vm: Machine, secret: bytes) -> None:
    """Replay, host -> guest: an exec request that ran once (it appends a line to a log) is
    sent again later in the same session. The guest must refuse it: the log keeps one line,
    and the request it was slipped in before does not run either."""
    log = _marker("replay-log")
    marker = _marker("replay")
    mitm = Mitm(vm.run.agent)
    records = mitm.records[Direction.HOST_TO_GUEST]
    async with _session_via(mitm, vm, secret) as client:
        before = len(records)
        result = await client.exec(["sh", "-c", f"echo x >> {log}"])
        assert result.exit_code == 0
        assert len(records) == before + 1, "the exec request was not one record"
        mitm.arm(Direction.HOST_TO_GUEST, Attack.REPLAY, records[before])
        with pytest.raises(ChannelAuthError) as caught:
            await client.exec(_touch(marker))
    assert mitm.fired == [Attack.REPLAY]
    _assert_guest_ended(caught.value, mitm)
    await _assert_usable(vm, secret, marker)
    client = await _connect(vm, secret)
    try:
        assert (await client.exec(["cat", log])).stdout == b"x\n", "the replayed request ran"
    finally:
        await client.close()


@pytest.mark.parametrize("attack", [Attack.SWAP, Attack.TRUNCATE], ids=lambda a: a.value)
async def test_swapped_or_truncated_host_records_are_refused(
    vm: Machine, secret: bytes, attack: Attack
) -> None:
    """Reorder and truncation, host -> guest: two exec requests go out back to back; the
    relay swaps them, or sends the first one's first half followed by the second. The guest
    must refuse the stream at the first bad record: neither command runs."""
    first, second = _marker(f"{attack.value}-1"), _marker(f"{attack.value}-2")
    mitm = Mitm(vm.run.agent)
    async with _session_via(mitm, vm, secret) as client:
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        mitm.arm(Direction.HOST_TO_GUEST, attack)
        results = await asyncio.gather(
            client.exec(_touch(first)), client.exec(_touch(second)), return_exceptions=True
        )
    assert mitm.fired == [attack]
    kinds = [kind for kind, _ in mitm.sent[Direction.HOST_TO_GUEST][-2:]]
    assert kinds == (["swapped", "held back"] if attack is Attack.SWAP else ["truncated", "record"])
    for result in results:
        assert isinstance(result, BaseException), f"a request succeeded: {result!r}"
        _assert_guest_ended(result, mitm)
    await _assert_usable(vm, secret, first, second)


async def test_a_stream_cut_inside_a_host_record_runs_nothing(vm: Machine, secret: bytes) -> None:
    """Truncation by a cut, host -> guest: the relay sends the first half of an exec request
    and then closes both connections. The pending call fails, the half record never runs, and
    the next host is served.

    The guest may not see that host leave (a close and a reconnect of the port in quick
    succession can look like nothing happened to a reader blocked in read()), and then the half
    record is still waiting for its other half: so the next host pads the stream first, as
    warden does when it takes over a VM whose earlier host vanished (``Machine.attach``)."""
    marker = _marker("cut")
    mitm = Mitm(vm.run.agent)
    async with _session_via(mitm, vm, secret) as client:
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        mitm.arm(Direction.HOST_TO_GUEST, Attack.CUT)
        with pytest.raises(WardenError, match="closed the connection"):
            await client.exec(_touch(marker))
    assert mitm.fired == [Attack.CUT]
    kinds = [kind for kind, _ in mitm.sent[Direction.HOST_TO_GUEST]]
    assert kinds[-1] == "truncated", kinds
    await _assert_usable(vm, secret, marker, resync=True)


async def test_a_record_from_another_session_is_refused(vm: Machine, secret: bytes) -> None:
    """Injection, host -> guest: an exec request of one session (same VM, same secret) is
    withheld by the relay, never delivered; in a second session it is injected at the very
    same position (the same record number, so the same nonce). Only the session keys differ,
    and they must: the guest refuses it and the command never runs."""
    marker = _marker("inject")
    first = Mitm(vm.run.agent)
    async with _session_via(first, vm, secret) as client:
        first.arm(Direction.HOST_TO_GUEST, Attack.WITHHOLD)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.exec(_touch(marker)), 2.0)
    captured = first.withheld
    assert captured is not None
    position = first.records[Direction.HOST_TO_GUEST].index(captured)

    second = Mitm(vm.run.agent)
    async with _session_via(second, vm, secret) as client:
        while len(second.records[Direction.HOST_TO_GUEST]) < position:
            await client.ping()
        assert len(second.records[Direction.HOST_TO_GUEST]) == position  # the next one's
        second.arm(Direction.HOST_TO_GUEST, Attack.INJECT, captured)
        with pytest.raises(ChannelAuthError) as caught:
            await client.exec(["true"])
    assert second.fired == [Attack.INJECT]
    assert second.handshakes[Direction.GUEST_TO_HOST] != first.handshakes[Direction.GUEST_TO_HOST]
    _assert_guest_ended(caught.value, second)
    await _assert_usable(vm, secret, marker)


# -- a man in the middle, guest -> host, and on the handshake ------------------------------


@pytest.mark.parametrize("attack", [Attack.FLIP, Attack.REPLAY], ids=lambda a: a.value)
async def test_a_tampered_guest_record_is_refused(
    vm: Machine, secret: bytes, attack: Attack
) -> None:
    """Bit flip and replay, guest -> host: one bit of the agent's answer to an exec is
    flipped, or the last record of its answer to the exec before is sent again ahead of it.
    The client must refuse it (ChannelAuthError naming the record), not hand out altered or
    stale output, and the session is dead from then on."""
    mitm = Mitm(vm.run.agent)
    records = mitm.records[Direction.GUEST_TO_HOST]
    async with _session_via(mitm, vm, secret) as client:
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        mitm.arm(Direction.GUEST_TO_HOST, attack, records[-1])
        with pytest.raises(ChannelAuthError, match="failed authentication") as caught:
            await client.exec(["echo", "genuine"])
        with pytest.raises(ChannelAuthError):  # the session is dead: the next call too
            await client.ping()
    assert mitm.fired == [attack]
    assert vm.id in str(caught.value)
    await _assert_usable(vm, secret)


@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
async def test_a_flipped_bit_in_a_handshake_is_refused(
    vm: Machine, secret: bytes, direction: Direction
) -> None:
    """Handshake tampering: one bit of the ephemeral key in the host's (or the guest's)
    handshake message is flipped. The handshake must fail on the side that reads it, and the
    client must say so (ChannelAuthError) before any request goes out."""
    mitm = Mitm(vm.run.agent)
    mitm.arm(direction, Attack.FLIP_HANDSHAKE)
    with pytest.raises(ChannelAuthError, match="altered") as caught:
        async with _session_via(mitm, vm, secret):
            pass
    assert mitm.fired == [Attack.FLIP_HANDSHAKE]
    assert mitm.records[Direction.HOST_TO_GUEST] == [], "a record went out after a bad handshake"
    if direction is Direction.HOST_TO_GUEST:  # the guest refused it
        assert "refused the handshake" in str(caught.value), str(caught.value)
    await _assert_usable(vm, secret)


async def test_a_stale_handshake_does_not_break_a_takeover(vm: Machine, secret: bytes) -> None:
    """Takeover after an unanswered handshake: a host dies in the middle of a record; the next
    host, which does not pad the stream, sends its handshake (the guest takes it for the rest
    of that record) and gives up; a third host takes over as warden does (padding first, then
    its handshake). Its session must work: the guest's answer to the dead host's handshake,
    which comes first, is stale, not a reason to fail.

    The three hosts share one connection here: that is what the guest sees when it does not
    notice hosts come and go (see the cut test), and it makes the order of the bytes certain.
    """
    reader, writer = await asyncio.open_unix_connection(str(vm.run.agent))
    try:
        dead = Initiator(secret)
        writer.write(dead.data_to_send())
        session = None
        while session is None:
            data = await asyncio.wait_for(reader.read(4096), CONNECT_S)
            assert data, "the agent closed the connection"
            session = dead.receive(data)
        record = session.seal(bytes(200))
        writer.write(record[: len(record) // 2])  # dies in the middle of a record
        writer.write(Initiator(secret).data_to_send())  # the host that does not pad
        await writer.drain()
        client = await AgentClient.from_streams(
            reader, writer, timeout=CONNECT_S, secret=secret, resync=True, name=vm.id
        )
        try:
            assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"
        finally:
            await client.close()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    await _assert_usable(vm, secret)


# -- wrong secrets, plaintext --------------------------------------------------------------


async def test_a_wrong_secret_is_refused(vm: Machine, secret: bytes) -> None:
    """Wrong secret: a host that does not hold the VM's secret is refused at the handshake,
    with an error that says the two sides hold different secrets; the right one still works."""
    wrong = os.urandom(32)
    assert wrong != secret
    with pytest.raises(ChannelAuthError, match="different secrets"):
        await _connect(vm, wrong)
    await _assert_usable(vm, secret)


async def test_plaintext_frames_get_no_answer(vm: Machine, secret: bytes) -> None:
    """Plaintext: a client without the channel (plain HELLO and an exec request, as before the
    encrypted channel) gets no answer at all: the guest waits for a handshake and runs nothing.
    The guest stays usable through the channel."""
    marker = _marker("plaintext")
    started = time.monotonic()
    with pytest.raises(AgentTimeoutError):
        await _connect(vm, None, timeout=SILENCE_S)
    assert time.monotonic() - started < SILENCE_S + 10

    # Frames written raw, the request right behind the HELLO: nothing may come back.
    hello = {
        Key.VERSIONS: [SESSION_VERSION],
        Key.NONCE: os.urandom(16).hex(),
        Key.SEED: os.urandom(32).hex(),
        Key.TIME: time.time(),
    }
    request = {Key.OP: Op.EXEC, Key.ARGV: _touch(marker), Key.STDIN: False, Key.USER: "root"}
    reader, writer = await asyncio.open_unix_connection(str(vm.run.agent))
    try:
        writer.write(
            encode_json(FrameType.HELLO, 0, hello) + encode_json(FrameType.REQUEST, 1, request)
        )
        await writer.drain()
        answer = await _read_for(reader, SILENCE_S)
        # At most the notice that ends a session an earlier host left (the guest cannot always
        # see a host go): nothing that answers the frames.
        assert answer.replace(abort_notice(), b"") == b"", f"the guest answered: {answer!r}"
    finally:
        writer.close()
        await writer.wait_closed()
    await _assert_usable(vm, secret, marker)


# -- clones of one boot template -----------------------------------------------------------


async def _inject_across(a: Machine, secret_a: bytes, b: Machine, secret_b: bytes) -> None:
    """A record withheld from a session with clone A, injected into one with clone B at the
    same position, is refused; the two guests' handshake messages differ."""
    marker = _marker("clone")
    first = Mitm(a.run.agent)
    async with _session_via(first, a, secret_a) as client:
        first.arm(Direction.HOST_TO_GUEST, Attack.WITHHOLD)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.exec(_touch(marker)), 2.0)
    captured = first.withheld
    assert captured is not None
    position = first.records[Direction.HOST_TO_GUEST].index(captured)
    second = Mitm(b.run.agent)
    async with _session_via(second, b, secret_b) as client:
        assert len(second.records[Direction.HOST_TO_GUEST]) == position  # the next one's
        second.arm(Direction.HOST_TO_GUEST, Attack.INJECT, captured)
        with pytest.raises(ChannelAuthError) as caught:
            await client.exec(["true"])
    assert second.fired == [Attack.INJECT]
    _assert_guest_ended(caught.value, second)
    # The guests' ephemeral keys (their handshake messages past the header) differ.
    hs_a = first.handshakes[Direction.GUEST_TO_HOST]
    hs_b = second.handshakes[Direction.GUEST_TO_HOST]
    assert hs_a.startswith(MAGIC) and hs_b.startswith(MAGIC)
    assert hs_a[HANDSHAKE_HEADER_SIZE:] != hs_b[HANDSHAKE_HEADER_SIZE:]
    await _assert_usable(a, secret_a, marker)
    await _assert_usable(b, secret_b, marker)


async def _clone_checks(a: Machine, b: Machine, template_secret: bytes) -> None:
    secret_a, secret_b = _secret(a), _secret(b)
    for machine in (a, b):
        with pytest.raises(ChannelAuthError, match="different secrets"):
            await _connect(machine, template_secret)
    with pytest.raises(ChannelAuthError, match="different secrets"):
        await _connect(b, secret_a)
    with pytest.raises(ChannelAuthError, match="different secrets"):
        await _connect(a, secret_b)
    await _inject_across(a, secret_a, b, secret_b)


def test_clones_of_a_boot_template_get_their_own_secrets(vm: Machine, no_leaks: None) -> None:
    """Clones: two VMs cloned from one boot template start with the template's secret in
    their memory. Each must be handed one of its own: the three differ, the template's opens
    neither clone, A's does not open B (nor B's A), and a record of a session with A is
    refused by B."""
    assert vm.boot_template is not None
    with (
        warden.Sandbox.create(memory_mib=MEMORY, timeout=180) as sbx_a,
        warden.Sandbox.create(memory_mib=MEMORY, timeout=180) as sbx_b,
    ):
        a, b = _machine(sbx_a), _machine(sbx_b)
        assert (a.booted_from, b.booted_from) == ("template", "template")
        assert a.boot_template == b.boot_template == vm.boot_template
        template_secret = ChannelKeys(Paths.from_env()).template(vm.boot_template)
        assert template_secret is not None
        secrets = {template_secret, _secret(a), _secret(b)}
        assert len(secrets) == 3, "two of the template's and its clones' secrets are equal"
        _release_agent(a)
        _release_agent(b)
        asyncio.run(_clone_checks(a, b, template_secret))
