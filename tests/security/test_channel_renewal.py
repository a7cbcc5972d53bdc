"""A VM whose agent session fails authentication gets a new session, against a real VM.

The alteration is made on the host's side of the socket, in the host's own channel layer: one
bit of one outgoing record is flipped after it was sealed, which is what a man in the middle
on the chardev socket would do (tests/security/test_channel.py runs a real one; this test
checks what the manager does about it). The agent refuses the record, runs nothing of it and
says so; the pending request fails with ChannelAuthError; the VM stays running, and the next
request goes through a new session (a new handshake with the VM's secret).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from warden import Sandbox
from warden._errors import ChannelAuthError, ProtocolError
from warden.agent.client import AgentClient
from warden.vmm.machine import MAX_SESSION_RENEWALS, Machine
from warden.vmm.state import VMState

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sbx() -> Iterator[Sandbox]:
    with Sandbox.create() as sandbox:
        yield sandbox


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def _tamper_next_record(agent: AgentClient) -> None:
    """Flip a bit in the next record the host sends (after sealing: the channel must catch it)."""
    layer = agent._layer
    assert layer is not None, "the VM's channel is not encrypted"
    seal = layer.seal

    def tampered(frames: bytes) -> bytes:
        layer.seal = seal  # type: ignore[method-assign]
        sealed = bytearray(seal(frames))
        sealed[-3] ^= 0x10
        return bytes(sealed)

    layer.seal = tampered  # type: ignore[method-assign]


def _wait_for_new_session(machine: Machine, old: AgentClient) -> None:
    deadline = time.monotonic() + 60
    while machine._agent is old or machine._agent is None or machine._agent.closed:
        assert machine.state is VMState.RUNNING, machine.error
        assert time.monotonic() < deadline, "no new session"
        time.sleep(0.05)


def test_a_tampered_record_fails_its_request_and_a_new_session_serves_the_next(
    sbx: Sandbox,
) -> None:
    machine = _machine(sbx)
    old = machine._agent
    assert old is not None
    _tamper_next_record(old)
    with pytest.raises(ChannelAuthError, match="ended the session"):
        sbx.commands.run("touch /home/user/tampered")
    _wait_for_new_session(machine, old)
    assert machine.state is VMState.RUNNING
    result = sbx.commands.run("ls /home/user; echo ok")
    assert result.stdout.endswith("ok\n")
    assert "tampered" not in result.stdout, "the refused request ran"


def test_a_path_that_keeps_altering_traffic_makes_the_vm_unhealthy(sbx: Sandbox) -> None:
    machine = _machine(sbx)
    while machine._renewals < MAX_SESSION_RENEWALS:
        old = machine._agent
        assert old is not None
        _tamper_next_record(old)
        with pytest.raises(ChannelAuthError):
            sbx.commands.run("true")
        _wait_for_new_session(machine, old)
    last = machine._agent
    assert last is not None
    _tamper_next_record(last)
    with pytest.raises(ChannelAuthError):
        sbx.commands.run("true")
    assert machine.state is VMState.UNHEALTHY
    assert "channel" in (machine.error or "")
    with pytest.raises(Exception, match="unhealthy"):
        sbx.commands.run("true")
    assert issubclass(ChannelAuthError, ProtocolError)
