"""Files in and out of a real microVM: streamed, binary-safe, with clear errors.

Every test runs in both modes (``sdk``: embedded, or through a `warden serve` daemon).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warden import GuestFileError, Sandbox, SizeLimitError

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
    sbx.files.write("/home/user/t.txt", "héllo\n")
    assert sbx.files.read("/home/user/t.txt") == "héllo\n"
    assert sbx.files.read("/home/user/t.txt", format="bytes") == "héllo\n".encode()
    sbx.files.write("/home/user/empty", b"")
    assert sbx.files.read("/home/user/empty", format="bytes") == b""


def test_mode_and_parents(sbx: Sandbox) -> None:
    sbx.files.write("/tmp/new/dir/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sbx.commands.run(["/tmp/new/dir/run.sh"]).stdout == "ran\n"
    assert sbx.files.stat("/tmp/new/dir/run.sh").mode & 0o777 == 0o755


def test_list_stat_mkdir_remove(sbx: Sandbox) -> None:
    sbx.files.make_dir("/home/user/srv/a/b")
    sbx.files.make_dir("/home/user/srv/a/b")  # exists already: fine
    sbx.files.write("/home/user/srv/a/f.txt", "12345")
    names = sorted(e.name for e in sbx.files.list("/home/user/srv/a"))
    assert names == ["b", "f.txt"]
    st = sbx.files.stat("/home/user/srv/a/f.txt")
    assert (st.type, st.size, st.path) == ("file", 5, "/home/user/srv/a/f.txt")
    assert sbx.files.stat("/home/user/srv/a/b").type == "dir"
    assert sbx.files.exists("/home/user/srv/a/f.txt")
    sbx.files.remove("/home/user/srv/a", recursive=True)
    assert not sbx.files.exists("/home/user/srv/a")


def test_errors_name_the_path(sbx: Sandbox) -> None:
    with pytest.raises(GuestFileError, match="/no/such/file"):
        sbx.files.read("/no/such/file")
    with pytest.raises(GuestFileError, match="/no/such/dir"):
        sbx.files.list("/no/such/dir")
    sbx.files.make_dir("/home/user/srv/full")
    sbx.files.write("/home/user/srv/full/x", "x")
    with pytest.raises(GuestFileError):
        sbx.files.remove("/home/user/srv/full")  # not empty and not recursive
    # As the unprivileged user, the system's files are off limits.
    with pytest.raises(GuestFileError, match="/usr/local/bin/") as denied:
        sbx.files.write("/usr/local/bin/mine", "x")
    assert denied.value.errno == errno.EACCES


def test_files_belong_to_the_user_and_root_is_asked_for(sbx: Sandbox, sdk: Any) -> None:
    sbx.files.write("/home/user/mine.txt", "x")
    assert sbx.commands.run("stat -c %u:%g /home/user/mine.txt").stdout == "1000:1000\n"
    with pytest.raises(GuestFileError, match="/root") as denied:
        sbx.files.list("/root")
    assert denied.value.errno == errno.EACCES
    # The daemon's caller is its admin here, whom the default policy grants exec-as-root.
    # The root filesystem image is read-only underneath, but the overlay makes it writable.
    sbx.files.write("/usr/local/bin/mine", "x", user="root")
    assert sbx.files.read("/usr/local/bin/mine") == "x"
    assert sbx.files.stat("/usr/local/bin/mine", user="root").size == 1
    sbx.files.remove("/usr/local/bin/mine", user="root")


def test_reads_honour_max_size(sbx: Sandbox, tmp_path: Path) -> None:
    sbx.commands.run("head -c 3000 /dev/zero | tr '\\0' r > /home/user/r.txt")
    assert sbx.files.read("/home/user/r.txt", max_size=3000) == "r" * 3000
    with pytest.raises(SizeLimitError, match="max_size=2999"):
        sbx.files.read("/home/user/r.txt", max_size=2999)
    with pytest.raises(SizeLimitError, match="max_size=100"):
        b"".join(sbx.files.stream("/home/user/r.txt", max_size=100))
    # download: refused before any transfer by the size, and nothing is left
    dest = tmp_path / "r.txt"
    with pytest.raises(SizeLimitError, match="max_size=1000"):
        sbx.files.download("/home/user/r.txt", dest, max_size=1000)
    assert os.listdir(tmp_path) == []
    assert sbx.files.download("/home/user/r.txt", dest) == 3000
    assert dest.read_text() == "r" * 3000
    # an endless file has no size to refuse it by: it is cut off at the limit
    with pytest.raises(SizeLimitError, match="max_size=2000000"):
        sbx.files.download("/dev/zero", tmp_path / "zero", max_size=2_000_000)
    assert os.listdir(tmp_path) == ["r.txt"]
