"""The transfer window's pieces are authenticated, against a real VM (embedded SDK).

Large writes put their bytes in the VM's window file and send only a tagged reference through
the encrypted channel (``warden.channel.window``). Here someone who can write the window file
(it is root's on the host and the VM uid's in its jail) alters a piece after the host wrote
it and before the guest reads it; the test does that from the host's own client, right after
its ``pwrite``. The agent must refuse the piece, write nothing of the file, and say why; the
next writes (several in one session: pieces are numbered per session) must work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from warden import Sandbox
from warden._errors import WardenError
from warden.agent import client as client_module
from warden.wire.frame import decode_xfer_ref

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sbx() -> Iterator[Sandbox]:
    with Sandbox.create() as sandbox:
        yield sandbox


def test_several_window_writes_in_one_session_arrive_intact(sbx: Sandbox) -> None:
    for size in (3 << 20, (2 << 20) + 17, 5 << 20):
        data = os.urandom(size)
        assert sbx.files.write("/home/user/w.bin", data) == size
        digest = sbx.commands.run("sha256sum /home/user/w.bin").stdout.split()[0]
        assert digest == hashlib.sha256(data).hexdigest()


def test_an_altered_piece_is_refused_and_nothing_is_written(
    sbx: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    put = client_module._XferWindow.put
    altered: list[int] = []

    async def put_then_alter(
        self: client_module._XferWindow, request_id: int, data: memoryview
    ) -> bytes | None:
        reference = await put(self, request_id, data)
        if reference is not None and not altered:  # the first piece, after the host wrote it
            offset, _length = decode_xfer_ref(reference)
            byte = os.pread(self.fd, 1, offset + 1000)
            os.pwrite(self.fd, bytes([byte[0] ^ 0x01]), offset + 1000)
            altered.append(offset)
        return reference

    monkeypatch.setattr(client_module._XferWindow, "put", put_then_alter)
    with pytest.raises(WardenError, match="failed authentication"):
        sbx.files.write("/home/user/altered.bin", os.urandom(3 << 20))
    assert altered, "no piece went through the window"
    monkeypatch.undo()
    listing = sbx.commands.run("ls -a /home/user").stdout
    assert "altered" not in listing  # neither the file nor its temp file
    data = os.urandom(2 << 20)
    assert sbx.files.write("/home/user/after.bin", data) == len(data)
    assert sbx.files.read("/home/user/after.bin", format="bytes") == data
