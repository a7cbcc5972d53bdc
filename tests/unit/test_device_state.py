"""``snapshot.save_device_state`` against a fake QMP client (the real command runs in
tests/integration/test_fork.py and test_templates.py): what it asks QEMU, in order, and that a
refusal or a QEMU that never answers becomes a VMError, the fd set removed either way."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from warden._errors import VMError
from warden.vmm import snapshot


class FakeQMP:
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sent_fds: list[int] = []

    def send_fd_scm(self, fd: int) -> None:
        os.fstat(fd)  # still open when sent
        self.sent_fds.append(fd)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> object:
        self.calls.append((cmd, args or {}))
        if cmd == "add-fd":
            if self.fail == "add-fd":
                await asyncio.sleep(3600)
            return {"fdset-id": 3, "fd": 27}
        if cmd == self.fail == "xen-save-devices-state":
            sent = Message({"execute": cmd})
            error = Message({"error": {"class": "GenericError", "desc": "no space"}})
            raise ExecuteError(ErrorResponse(error), sent, error)
        if cmd == "xen-save-devices-state" and self.fail == "hang":
            await asyncio.sleep(3600)
        return {}


def _run(qmp: FakeQMP) -> None:
    fd = os.memfd_create("device-state-test", os.MFD_CLOEXEC)
    try:
        asyncio.run(snapshot.save_device_state(qmp, fd, "saving it"))  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_it_saves_through_an_fd_set_and_removes_it() -> None:
    qmp = FakeQMP()
    _run(qmp)
    assert [c for c, _ in qmp.calls] == ["add-fd", "xen-save-devices-state", "remove-fd"]
    assert qmp.calls[1][1] == {"filename": "/dev/fdset/3", "live": False}
    assert qmp.calls[2][1] == {"fdset-id": 3}
    assert len(qmp.sent_fds) == 1


def test_a_refusal_is_a_vm_error_and_the_set_is_removed() -> None:
    qmp = FakeQMP(fail="xen-save-devices-state")
    with pytest.raises(VMError, match="saving it failed: no space"):
        _run(qmp)
    assert qmp.calls[-1][0] == "remove-fd"


def test_a_qemu_that_never_answers_is_a_vm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "MIGRATE_TIMEOUT_S", 0.2)
    qmp = FakeQMP(fail="hang")
    with pytest.raises(VMError, match="took over"):
        _run(qmp)
    assert qmp.calls[-1][0] == "remove-fd"


def test_a_qemu_that_never_adds_the_fd_is_a_vm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "MIGRATE_TIMEOUT_S", 0.2)
    qmp = FakeQMP(fail="add-fd")
    with pytest.raises(VMError, match="did not answer add-fd"):
        _run(qmp)
    assert [c for c, _ in qmp.calls] == ["add-fd"]
