"""A guest that fills its writable layer stays answerable, against a real 128 MiB VM.

The layer is a tmpfs in the guest's RAM. At half of a 128 MiB guest's RAM (as it was), a
``dd`` that filled it left too little for the kernel, the agent and the page cache: the guest
thrashed with its vCPU at 100%, and its agent missed its deadlines (the VM turned unhealthy).
The layer now leaves ``RW_RESERVE_KB`` of RAM (``image/initramfs.py``): the write ends with
ENOSPC and the agent answers at once.
"""

from __future__ import annotations

import time

import pytest

from warden import Sandbox
from warden.image.initramfs import RW_RESERVE_KB

pytestmark = pytest.mark.vm


def test_filling_the_disk_of_a_small_vm_leaves_it_answering(no_leaks: None) -> None:
    with Sandbox.create(memory_mib=128) as sbx:
        meminfo = sbx.commands.run("grep MemTotal /proc/meminfo").stdout
        total_kb = int(meminfo.split()[1])
        size_kb = int(sbx.commands.run("df -k /home/user | tail -1").stdout.split()[1])
        assert size_kb <= total_kb - RW_RESERVE_KB + 1024, (size_kb, total_kb)
        fill = sbx.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M", timeout=120)
        assert "No space left on device" in fill.stderr, fill.stderr
        assert sbx.commands.run("df -k /home/user | tail -1").stdout.split()[4] == "100%"
        start = time.monotonic()
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert time.monotonic() - start < 5
        assert sbx.commands.run("rm /home/user/fill && echo freed").stdout == "freed\n"
