"""The peer: Debian's qemu-guest-agent in the same kernel and rootfs, under the same QEMU.

The guest boots the same initramfs with ``warden.mode=qga``, which execs ``qemu-ga`` on the
virtio-serial port ``org.qemu.guest_agent.0`` instead of warden's agent. The host talks QGA's
JSON protocol to it: ``guest-exec`` + ``guest-exec-status`` and ``guest-file-write``, as
libvirt's ``virsh qemu-agent-command`` users do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from warden.config import Paths
from warden.image.store import load_image
from warden.vmm.argv import QGA_PORT_NAME, BootFiles, RuntimeFiles, build_argv
from warden.vmm.machine import tsc_khz
from warden.vmm.spec import VMSpec


def _sync_reply(line: bytes) -> int | None:
    with contextlib.suppress(ValueError):
        reply = json.loads(line.lstrip(b"\xff"))
        if isinstance(reply, dict) and isinstance(reply.get("return"), int):
            return int(reply["return"])
    return None


class QgaVM:
    """A QEMU microVM running qemu-ga, with a minimal async QGA client."""

    def __init__(self, memory_mib: int = 256, *, tuned: bool = False) -> None:
        """``tuned`` gives the peer warden's TCG kernel settings (see ``kernel_cmdline``);
        by default it boots with the stock command line, as a QEMU user would."""
        self.memory_mib = memory_mib
        self.tuned = tuned
        self._dir = Path(tempfile.mkdtemp(prefix="warden-bench-qga-"))
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self, timeout: float = 60.0) -> None:
        """Boot and wait until ``guest-sync`` answers."""
        image = load_image(Paths.from_env(), "default")
        boot = BootFiles(image.kernel.path, image.initrd.path, image.rootfs.path)
        run = RuntimeFiles(self._dir)
        argv = build_argv(
            VMSpec(memory_mib=self.memory_mib),
            boot,
            run,
            accel="tcg",
            qemu=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            mode="qga",
            agent_port=QGA_PORT_NAME,
            tsc_khz=tsc_khz(),  # not for speed: without it a busy host hangs the guest's boot
            tune=self.tuned,
        )
        # The same devices as a warden VM; qemu-ga never touches the transfer window disk.
        with open(run.xfer, "wb") as f:
            f.truncate(1 << 20)
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(run.agent))
                break
            except OSError:
                if self._proc.returncode is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        await asyncio.wait_for(self._sync(), max(0.1, deadline - time.monotonic()))

    async def _sync(self) -> None:
        """guest-sync-delimited until the agent answers, then drain the stale answers.

        The agent is not up for the first seconds; asking every 50 ms keeps the measured
        start-up time within 50 ms of when it could first answer.
        """
        assert self._reader is not None
        sent: set[int] = set()
        while True:
            await self._send_sync(sent)
            try:
                line = await asyncio.wait_for(self._reader.readuntil(b"\n"), 0.05)
            except TimeoutError:
                continue
            if _sync_reply(line) in sent:
                break
        final: set[int] = set()
        await self._send_sync(final)
        while _sync_reply(await self._reader.readuntil(b"\n")) not in final:
            pass

    async def _send_sync(self, sent: set[int]) -> None:
        assert self._writer is not None
        token = secrets.randbelow(2**31) + 1
        sent.add(token)
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._writer.write(b"\xff" + json.dumps(msg).encode() + b"\n")
        await self._writer.drain()

    async def call(self, command: str, **arguments: Any) -> Any:
        assert self._reader is not None and self._writer is not None
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        reply = json.loads(await self._reader.readuntil(b"\n"))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    async def exec(self, path: str, args: list[str]) -> tuple[int, bytes]:
        """guest-exec, then poll guest-exec-status as fast as it answers."""
        pid = (await self.call("guest-exec", path=path, arg=args, **{"capture-output": True}))[
            "pid"
        ]
        while True:
            status = await self.call("guest-exec-status", pid=pid)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", ""))
                return int(status.get("exitcode", -1)), out

    async def write_file(self, path: str, data: bytes, chunk: int = 1 << 20) -> None:
        handle = await self.call("guest-file-open", path=path, mode="w")
        try:
            for off in range(0, len(data), chunk):
                part = data[off : off + chunk]
                await self.call(
                    "guest-file-write",
                    handle=handle,
                    **{"buf-b64": base64.b64encode(part).decode()},
                )
        finally:
            await self.call("guest-file-close", handle=handle)

    async def stop(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
