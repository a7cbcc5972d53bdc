"""Files in and out of a real microVM: streamed, binary-safe, with clear errors.

Every test runs in both modes (``sdk``: embedded, or through a `warden serve` daemon).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any

import pytest

from warden import GuestFileError, Sandbox

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sbx(sdk: Any) -> Iterator[Sandbox]:
    with sdk.Sandbox.create(memory_mib=512) as s:
        yield s


def test_64_mib_binary_round_trip(sbx: Sandbox) -> None:
    data = os.urandom(64 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    assert sbx.files.write("/tmp/big.bin", io.BytesIO(data)) == len(data)
    # The guest sees the same bytes...
    assert sbx.commands.run(["sha256sum", "/tmp/big.bin"]).stdout.split()[0] == digest
    # ...and they come back unchanged, streamed in chunks.
    h = hashlib.sha256()
    chunks = 0
    for chunk in sbx.files.stream("/tmp/big.bin"):
        h.update(chunk)
        chunks += 1
    assert h.hexdigest() == digest
    assert chunks > 1
    sbx.files.remove("/tmp/big.bin")


def test_text_and_bytes(sbx: Sandbox) -> None:
    sbx.files.write("/root/t.txt", "héllo\n")
    assert sbx.files.read("/root/t.txt") == "héllo\n"
    assert sbx.files.read("/root/t.txt", format="bytes") == "héllo\n".encode()
    sbx.files.write("/root/empty", b"")
    assert sbx.files.read("/root/empty", format="bytes") == b""


def test_mode_and_parents(sbx: Sandbox) -> None:
    sbx.files.write("/opt/new/dir/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sbx.commands.run(["/opt/new/dir/run.sh"]).stdout == "ran\n"
    assert sbx.files.stat("/opt/new/dir/run.sh").mode & 0o777 == 0o755


def test_list_stat_mkdir_remove(sbx: Sandbox) -> None:
    sbx.files.make_dir("/srv/a/b")
    sbx.files.make_dir("/srv/a/b")  # exists already: fine
    sbx.files.write("/srv/a/f.txt", "12345")
    names = sorted(e.name for e in sbx.files.list("/srv/a"))
    assert names == ["b", "f.txt"]
    st = sbx.files.stat("/srv/a/f.txt")
    assert (st.type, st.size, st.path) == ("file", 5, "/srv/a/f.txt")
    assert sbx.files.stat("/srv/a/b").type == "dir"
    assert sbx.files.exists("/srv/a/f.txt")
    sbx.files.remove("/srv/a", recursive=True)
    assert not sbx.files.exists("/srv/a")


def test_errors_name_the_path(sbx: Sandbox) -> None:
    with pytest.raises(GuestFileError, match="/no/such/file"):
        sbx.files.read("/no/such/file")
    with pytest.raises(GuestFileError, match="/no/such/dir"):
        sbx.files.list("/no/such/dir")
    sbx.files.make_dir("/srv/full")
    sbx.files.write("/srv/full/x", "x")
    with pytest.raises(GuestFileError):
        sbx.files.remove("/srv/full")  # not empty and not recursive
    # The root filesystem image is read-only underneath, but the overlay makes it writable.
    sbx.files.write("/usr/local/bin/mine", "x")
    assert sbx.files.read("/usr/local/bin/mine") == "x"
