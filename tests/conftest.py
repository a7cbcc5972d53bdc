"""Shared fixtures. VM tests boot real QEMU microVMs under TCG with the default image."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.config import Paths


def qemu_pids() -> set[int]:
    """Pids of the QEMU processes of warden VMs (their argv names a runtime dir of ours)."""
    marker = str(Paths.from_env().vms).encode()
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if "qemu-system" in exe and marker in cmdline:
            pids.add(int(entry.name))
    return pids


def runtime_dirs() -> set[str]:
    vms = Paths.from_env().vms
    return {p.name for p in vms.iterdir()} if vms.is_dir() else set()


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a QEMU process or a runtime dir behind."""
    before_pids, before_dirs = qemu_pids(), runtime_dirs()
    yield
    assert qemu_pids() - before_pids == set(), "a QEMU process was left running"
    assert runtime_dirs() - before_dirs == set(), "a runtime dir was left behind"
