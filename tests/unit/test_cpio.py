"""The newc cpio writer, read back by a tiny parser here and by the system's GNU cpio."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warden.image.cpio import CpioWriter, normalize_path

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="GNU cpio is not installed")


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdev: tuple[int, int]


def parse_newc(blob: bytes) -> list[Member]:
    """A strict newc reader: checks magic, 4-byte alignment of names and data, the trailer."""
    out: list[Member] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at {pos} is not 4-byte aligned"
        head = blob[pos : pos + 110]
        assert head[:6] == b"070701", f"bad magic at {pos}: {head[:6]!r}"
        f = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size = f[:7]
        rdev = (f[9], f[10])
        namesize, check = f[11], f[12]
        assert check == 0
        name_end = pos + 110 + namesize
        assert blob[name_end - 1] == 0, "name is not NUL-terminated"
        name = blob[pos + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        assert blob[name_end:data_start] == b"\0" * (data_start - name_end)
        if name == "TRAILER!!!":
            rest = blob[data_start:]
            assert rest == b"\0" * len(rest), "garbage after the trailer"
            assert len(blob) % 512 == 0, "archive is not padded to 512 bytes"
            return out
        data = blob[data_start : data_start + size]
        end = data_start + size
        pad = -end % 4
        assert blob[end : end + pad] == b"\0" * pad
        out.append(Member(name, ino, mode, uid, gid, nlink, mtime, data, rdev))
        pos = end + pad


def sample_archive(tmp_path: Path) -> bytes:
    src = tmp_path / "source.bin"
    src.write_bytes(b"from a file\n" * 3)
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("etc/hello.txt", b"hello\n", mode=0o640)
        w.add_file("bin/tool", source=src, mode=0o755)
        w.add_symlink("bin/alias", "tool")
        w.add_dir("tmp", 0o1777)
        w.add_file("empty", b"")
        w.add_file("odd", b"x" * 5)
        w.add_device("dev/console", "c", 5, 1)
    return buf.getvalue()


def test_parser_reads_back_everything(tmp_path: Path) -> None:
    members = {m.name: m for m in parse_newc(sample_archive(tmp_path))}
    assert list(members) == sorted(members), "entries are written in sorted order"
    # Parent directories are added implicitly, with mode 0755.
    assert stat.S_ISDIR(members["etc"].mode) and stat.S_IMODE(members["etc"].mode) == 0o755
    assert stat.S_ISDIR(members["bin"].mode)
    assert stat.S_ISDIR(members["dev"].mode)
    hello = members["etc/hello.txt"]
    assert stat.S_ISREG(hello.mode) and stat.S_IMODE(hello.mode) == 0o640
    assert hello.data == b"hello\n"
    assert members["bin/tool"].data == b"from a file\n" * 3
    assert stat.S_IMODE(members["bin/tool"].mode) == 0o755
    link = members["bin/alias"]
    assert stat.S_ISLNK(link.mode) and link.data == b"tool"
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert members["empty"].data == b""
    assert members["odd"].data == b"xxxxx"
    console = members["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    for m in members.values():
        assert (m.uid, m.gid, m.mtime) == (0, 0, 0)
    assert sorted(m.ino for m in members.values()) == list(range(1, len(members) + 1))


def test_deterministic_whatever_the_insertion_order(tmp_path: Path) -> None:
    entries = [("a/b/c", b"1"), ("a/x", b"22"), ("z", b"333"), ("a/b/d", b"")]

    def build(order: list[tuple[str, bytes]]) -> bytes:
        buf = io.BytesIO()
        with CpioWriter(buf) as w:
            for name, data in order:
                w.add_file(name, data)
        return buf.getvalue()

    assert build(entries) == build(list(reversed(entries)))


@needs_cpio
def test_gnu_cpio_lists_and_extracts(tmp_path: Path) -> None:
    blob = sample_archive(tmp_path)
    listing = subprocess.run(
        [str(CPIO), "-t", "--quiet"], input=blob, capture_output=True, check=True
    ).stdout.decode()
    names = listing.split()
    assert names == sorted(names)
    assert {"etc/hello.txt", "bin/tool", "bin/alias", "dev/console", "tmp", "empty"} <= set(names)

    # Extract everything but the device node (mknod needs privileges we may not have).
    out = tmp_path / "out"
    out.mkdir()
    members = [n for n in names if n != "dev/console"]
    subprocess.run(
        [str(CPIO), "-i", "-d", "--quiet", "--no-absolute-filenames", *members],
        input=blob,
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "etc/hello.txt").read_bytes() == b"hello\n"
    assert stat.S_IMODE((out / "etc/hello.txt").stat().st_mode) == 0o640
    assert (out / "bin/tool").read_bytes() == b"from a file\n" * 3
    assert os.access(out / "bin/tool", os.X_OK)
    assert os.readlink(out / "bin/alias") == "tool"
    assert (out / "bin/alias").read_bytes() == b"from a file\n" * 3
    assert (out / "empty").read_bytes() == b""


def test_rejects_bad_input(tmp_path: Path) -> None:
    w = CpioWriter(io.BytesIO())
    for bad in ("", "/", "../etc", "a/../b", "a//b", "./a"):
        with pytest.raises(ValueError):
            w.add_file(bad, b"")
    with pytest.raises(ValueError):
        w.add_file("f", b"", source=tmp_path)
    with pytest.raises(ValueError):
        w.add_file("f")
    w.add_file("f", b"1")
    with pytest.raises(ValueError):
        w.add_file("f", b"2")
    with pytest.raises(ValueError):
        w.add_file("f/child", b"")  # a file cannot be a parent
    with pytest.raises(ValueError):
        w.add_symlink("l", "")
    w.trailer()
    with pytest.raises(ValueError):
        w.trailer()
    with pytest.raises(ValueError):
        w.add_file("late", b"")


def test_normalize_path() -> None:
    assert normalize_path("/init") == "init"
    assert normalize_path("lib/modules/") == "lib/modules"


def test_add_dir_twice_updates_mode() -> None:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("tmp/x", b"")
        w.add_dir("tmp", 0o1777)
    members = {m.name: m for m in parse_newc(buf.getvalue())}
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777


_segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8
).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=4).map("/".join)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=st.dictionaries(_paths, st.binary(max_size=300), min_size=1, max_size=12))
def test_random_file_sets_round_trip(files: dict[str, bytes], tmp_path: Path) -> None:
    # A path cannot be both a file and a directory; drop files that are parents of others.
    names = set(files)
    files = {n: d for n, d in files.items() if not any(o.startswith(n + "/") for o in names)}
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        for name, data in files.items():
            w.add_file(name, data, mode=0o600)
    blob = buf.getvalue()
    members = {m.name: m for m in parse_newc(blob)}
    for name, data in files.items():
        assert members[name].data == data
        assert stat.S_IMODE(members[name].mode) == 0o600
    dirs = {n for n, m in members.items() if stat.S_ISDIR(m.mode)}
    expected_dirs = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
    assert dirs == expected_dirs
    if CPIO is not None:
        listing = subprocess.run(
            [CPIO, "-t", "--quiet"], input=blob, capture_output=True, check=True
        ).stdout.decode()
        assert sorted(listing.split("\n")[:-1]) == sorted(members)
