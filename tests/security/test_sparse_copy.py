"""Copying a file out of a guest (`warden cp ID:SRC DST`) cannot fill the host's disk.

A hostile guest offers a sparse 1 TiB file, an endless one (/dev/zero, whose size says 0) and
a stream it never ends (/dev/urandom). The copy honours --max-size, writes zero runs as
holes, and leaves no file and no ``.part`` behind when it fails, or when it is stopped with
SIGTERM or SIGINT. Real VMs, the real daemon and the real CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import warden
from tests.integration.conftest import ServeProcess, serving

pytestmark = pytest.mark.vm

WARDEN = str(Path(sys.executable).parent / "warden")
MIB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("sparse")) as d:
        yield d


@pytest.fixture(scope="module")
def sbx(daemon: ServeProcess) -> Iterator[warden.Sandbox]:
    with warden.connect(daemon.url).Sandbox.create(memory_mib=256) as s:
        r = s.commands.run(
            "truncate -s 1T huge && truncate -s 200M holey && printf END >> holey && ls -l"
        )
        assert r.exit_code == 0, r.stderr
        yield s


def _cp(daemon: ServeProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [WARDEN, "cp", "--host", daemon.url, *args],
        capture_output=True,
        timeout=300,
        check=False,
    )


def test_a_sparse_terabyte_is_refused_by_its_size_at_once(
    daemon: ServeProcess, sbx: warden.Sandbox, tmp_path: Path
) -> None:
    started = time.monotonic()
    p = _cp(daemon, "--max-size", "64M", f"{sbx.id}:/home/user/huge", str(tmp_path / "out"))
    assert p.returncode == 125, p.stderr
    assert b"max_size=67108864" in p.stderr and b"1099511627776" in p.stderr
    assert time.monotonic() - started < 60  # refused before a transfer, not after 64 MiB
    assert os.listdir(tmp_path) == []


def test_an_endless_file_is_cut_at_the_limit_and_leaves_nothing(
    daemon: ServeProcess, sbx: warden.Sandbox, tmp_path: Path
) -> None:
    p = _cp(daemon, "--max-size", "8M", f"{sbx.id}:/dev/zero", str(tmp_path / "zero"))
    assert p.returncode == 125, p.stderr
    assert b"max_size=8388608" in p.stderr
    assert os.listdir(tmp_path) == []


def test_a_sparse_file_within_the_limit_keeps_its_holes(
    daemon: ServeProcess, sbx: warden.Sandbox, tmp_path: Path
) -> None:
    out = tmp_path / "holey"
    p = _cp(daemon, f"{sbx.id}:/home/user/holey", str(out))  # the default limit: 1 GiB
    assert p.returncode == 0, p.stderr
    st = out.stat()
    assert st.st_size == 200 * MIB + 3
    assert st.st_blocks * 512 < 4 * MIB, "200 MiB of zeros were written, not left as a hole"
    with open(out, "rb") as f:
        f.seek(200 * MIB - 5)
        assert f.read() == b"\0" * 5 + b"END"
    assert os.listdir(tmp_path) == ["holey"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_copy_leaves_no_file(
    daemon: ServeProcess, sbx: warden.Sandbox, tmp_path: Path, sig: signal.Signals
) -> None:
    source, dest = f"{sbx.id}:/dev/urandom", str(tmp_path / "noise")
    proc = subprocess.Popen(
        [WARDEN, "cp", "--host", daemon.url, "--max-size", "0", source, dest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_written_file(proc.pid, tmp_path)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, stderr
    assert b"nothing was kept" in stderr
    assert os.listdir(tmp_path) == []


def _wait_for_written_file(pid: int, folder: Path) -> None:
    """Until process ``pid`` has an open file in ``folder`` (its download) with data in it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
                if target.startswith(str(folder)) and os.stat(fd).st_size > MIB:
                    return
            except OSError:
                continue
        time.sleep(0.1)
    raise AssertionError("the copy wrote nothing within 60 s")
