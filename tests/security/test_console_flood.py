"""A root workload that floods the serial console cannot grow the host's console log past its cap.

QEMU's ``-chardev file`` had no cap: a guest writing ``/dev/ttyS0`` grew it at about 180 KB/s
for as long as it liked. The console now goes through a socket that the host reads into
``console.log`` + ``console.log.1`` (``vmm/console.py``), each at most half of CONSOLE_LOG_MAX.
Embedded mode: the VM's owner (this test's event loop) reads the console.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from warden.sdk import AsyncSandbox
from warden.vmm.console import CONSOLE_LOG_MAX
from warden.vmm.machine import Machine

pytestmark = pytest.mark.vm

LINE_BYTES = 64
"""Each flood line, with its newline (the tty adds a carriage return: 65 on the console)."""
LINES = (CONSOLE_LOG_MAX * 3 // 2) // LINE_BYTES
"""One and a half caps of output: at 180 KB/s about 9 s under TCG."""
FLOOD_S = 180.0
"""The flood's deadline: 9 s at the measured rate, with a wide margin for a loaded host."""

FLOOD = (
    "import sys\n"
    "with open('/dev/ttyS0', 'w') as tty:\n"
    f"    for i in range({LINES}):\n"
    f"        tty.write(f'flood {{i:08d}} ' + 'x' * {LINE_BYTES - 16} + '\\n')\n"
)


async def _wait_for(machine: Machine, text: str, deadline_s: float) -> str:
    """Poll the console tail until it shows ``text``; return the tail."""
    deadline = time.monotonic() + deadline_s
    while True:
        tail = machine.console_tail(5)
        if text in tail or time.monotonic() > deadline:
            return tail
        await asyncio.sleep(0.1)


async def test_a_console_flood_stays_at_the_cap() -> None:
    async with await AsyncSandbox.create(memory_mib=256) as sbx:
        machine = sbx._machine
        assert isinstance(machine, Machine)
        log, old = machine.console_log.path, machine.console_log.old
        result = await sbx.commands.run(["python3", "-c", FLOOD], user="root", timeout=FLOOD_S)
        assert result.exit_code == 0, result.stderr
        last = f"flood {LINES - 1:08d}"
        tail = await _wait_for(machine, last, 10.0)
        # The newest output is kept: the flood's last line is the console's last line.
        assert last in tail, tail
        assert log.stat().st_size <= CONSOLE_LOG_MAX // 2
        assert old.stat().st_size <= CONSOLE_LOG_MAX // 2  # it rotated: more than half came
        assert log.stat().st_size + old.stat().st_size <= CONSOLE_LOG_MAX
        # The oldest output was dropped: the kept lines start well after the first.
        kept = old.read_bytes() + log.read_bytes()
        numbers = [int(n) for n in re.findall(rb"flood (\d{8}) ", kept)]
        assert numbers and numbers[-1] == LINES - 1
        assert numbers[0] > 0, "the oldest output should have been rotated out"
        # What is kept is contiguous: no line in the kept window was lost.
        assert numbers == list(range(numbers[0], LINES)), "lines were lost inside the window"
        # Later output still reaches the log (the reader goes on).
        await sbx.commands.run(["sh", "-c", "echo after-flood > /dev/ttyS0"], user="root")
        assert "after-flood" in await _wait_for(machine, "after-flood", 10.0)
        assert (log.stat().st_mode & 0o777) == 0o600
