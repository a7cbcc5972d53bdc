"""`warden run` and `warden doctor` as a user types them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

WARDEN = str(Path(sys.executable).parent / "warden")


def _warden(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [WARDEN, *args], input=stdin, capture_output=True, timeout=300, check=False
    )


def test_run_streams_output_and_returns_the_exit_code(no_leaks: None) -> None:
    p = _warden("run", "-e", "X=42", "--", "sh", "-c", "echo x=$X; echo oops >&2; exit 7")
    assert p.returncode == 7
    assert p.stdout == b"x=42\n"
    assert p.stderr == b"oops\n"


def test_run_is_binary_safe_and_forwards_stdin(no_leaks: None) -> None:
    data = bytes(range(256)) * 64
    p = _warden("run", "-i", "--", "cat", stdin=data)
    assert p.returncode == 0
    assert p.stdout == data


def test_run_timeout(no_leaks: None) -> None:
    p = _warden("run", "--timeout", "1", "--", "sleep", "100")
    assert p.returncode == 124
    assert b"timeout" in p.stderr


def test_run_bad_input_is_refused_before_booting(no_leaks: None) -> None:
    p = _warden("run", "--memory", "0", "--", "true")
    assert p.returncode == 125
    assert b"memory_mib" in p.stderr


def test_doctor_reports_the_accelerator() -> None:
    p = _warden("doctor")
    out = p.stdout.decode()
    assert "accelerator" in out
    assert "tcg" in out or "kvm" in out


def test_run_as_the_user_by_default_and_as_root_on_request(no_leaks: None) -> None:
    p = _warden("run", "--", "sh", "-c", "id -u; pwd")
    assert (p.returncode, p.stdout) == (0, b"1000\n/home/user\n"), p.stderr
    p = _warden("run", "--user", "root", "--", "id", "-u")
    assert (p.returncode, p.stdout) == (0, b"0\n"), p.stderr
    p = _warden("run", "--user", "nobody", "--", "id", "-u")
    assert p.returncode == 125 and b"user" in p.stderr
