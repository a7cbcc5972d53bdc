"""The host side of a jailed launch.

The manager makes what the jailed QEMU may not make itself: the QMP, agent and console sockets,
bound by root in the root-only runtime dir; a saved state being loaded (a template's device
state, a pause file) is passed as an fd too. QEMU gets them at the numbers of
:class:`warden.vmm.argv.PassedFd`. The files it reads and writes (the transfer window; guest RAM
if file-backed) are bound into its root.

The process chain::

    [setpriv --pdeathsig KILL --]  unshare --mount --pid --net --fork --kill-child --
        python -I -S launcher.py --fd N -- qemu-system-x86_64 ...

``unshare`` (the process this manager spawns, and waits for) forks the launcher as PID 1 of
the new PID namespace; the launcher execs QEMU in place, so QEMU is that same process. The
launcher reports its *host* pid and start time on the status socket (fd N) before anything
else; :class:`JailedProcess` opens a pidfd on it and checks the start time, so the manager
signals exactly that process (and records its pid and start time for a later manager, which
checks them and the command line the same way before any kill). ``unshare`` exits when QEMU
does, so waiting for it is waiting for QEMU; QEMU dies with ``unshare`` (a parent-death signal
the launcher sets after the uid change), and an embedded VM's ``unshare`` dies with its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from warden._errors import LaunchError
from warden.jail.features import LAUNCHER, JailPlan
from warden.jail.launcher import DEVICES
from warden.vmm.argv import PassedFd, RuntimeFiles
from warden.vmm.ownership import proc_start_time

NOFILE = 256
"""QEMU's fd limit: a running VM holds about 20."""
NPROC = 512
"""QEMU's process and thread limit for its uid (its vCPUs, main loop and I/O workers)."""
FSIZE_MARGIN = 32 << 20
"""Beyond the guest's RAM, what a snapshot stream adds: page headers and device state."""
STATUS_TIMEOUT_S = 30.0


def namespace_prefix(plan: JailPlan, unshare: str) -> list[str]:
    """The ``unshare`` that makes the VM's namespaces (none: no prefix)."""
    flags = []
    if plan.mount:
        flags.append("--mount")
    if plan.pid:
        flags += ["--pid", "--fork", "--kill-child"]
    if plan.net:
        flags.append("--net")
    return [unshare, *flags, "--"] if flags else []


def launcher_argv(fd: int) -> list[str]:
    return [sys.executable, "-I", "-S", str(LAUNCHER), "--fd", str(fd), "--"]


def fsize_limit(memory_mib: int, xfer_bytes: int, *, writes_ram: bool) -> int:
    """The largest file the VM's QEMU may write: the transfer window, or, if it may save a
    snapshot or back RAM with a file, the guest's RAM plus a snapshot stream's overhead."""
    if writes_ram:
        return max(xfer_bytes, (memory_mib << 20) + FSIZE_MARGIN)
    return xfer_bytes + FSIZE_MARGIN


@dataclass
class JailConfig:
    """What the launcher reads from its status socket (length-prefixed ``marshal``)."""

    root: Path
    ro_files: list[str]
    id_files: list[str]
    rw_files: list[str]
    devices: list[str]
    uid: int | None
    cgroups: list[str]
    rlimits: dict[str, int]
    mount: bool
    nnp: bool
    pdeathsig: bool
    fds: list[list[int]] = field(default_factory=list)
    proc: bool = False
    """Mount a procfs that shows only QEMU (a clone opens its template RAM, and a link its
    region, through ``/proc/self/fd/N``)."""

    def encode(self) -> bytes:
        data = {
            "root": str(self.root),
            "ro_files": self.ro_files,
            "id_files": self.id_files,
            "rw_files": self.rw_files,
            "devices": self.devices,
            "uid": self.uid,
            "gid": self.uid,
            "cgroups": self.cgroups,
            "rlimits": self.rlimits,
            "mount": self.mount,
            "nnp": self.nnp,
            "pdeathsig": self.pdeathsig,
            "fds": self.fds,
            "proc": self.proc,
        }
        blob = marshal.dumps(data)
        return len(blob).to_bytes(4, "big") + blob


def devices(accel: str) -> list[str]:
    names = ["null", "zero", "urandom"]
    if accel == "kvm":
        names.append("kvm")
    assert set(names) <= set(DEVICES)
    return names


def rlimits(fsize: int) -> dict[str, int]:
    return {"nofile": NOFILE, "nproc": NPROC, "core": 0, "fsize": fsize}


@contextlib.contextmanager
def passed_fds(
    run: RuntimeFiles, restore: int | None, template_ram: int | None = None
) -> Iterator[dict[int, int]]:
    """Make the sockets a jailed QEMU gets; yield {our fd: QEMU's fd}. ``restore`` is the fd
    of a saved state (a template's device state, a pause file) to load, ``template_ram`` a clone's
    template RAM (the caller's: they stay open).

    Our copies are closed when the block ends (QEMU holds its own by then). The sockets are
    made under umask 077: root's, like the rest of the runtime dir.
    """
    with contextlib.ExitStack() as stack:
        mapping: dict[int, int] = {}
        for path, target in (
            (run.qmp, PassedFd.QMP),
            (run.agent, PassedFd.AGENT),
            (run.console_sock, PassedFd.CONSOLE),
        ):
            sock = stack.enter_context(_listening(path))
            mapping[sock.fileno()] = target
        if restore is not None:
            mapping[restore] = PassedFd.INCOMING
        if template_ram is not None:
            mapping[template_ram] = PassedFd.TEMPLATE_RAM
        yield mapping


@contextlib.contextmanager
def _listening(path: Path) -> Iterator[socket.socket]:
    path.unlink(missing_ok=True)  # a restore that failed left QEMU's last one
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    with sock:
        yield sock


class JailedProcess:
    """A QEMU started through the jail. Quacks like ``asyncio.subprocess.Process`` for what
    ``Machine`` uses: ``pid`` (QEMU's host pid), ``returncode`` and ``wait()`` (of the
    ``unshare`` that waits for QEMU), ``send_signal()`` (to QEMU, through its pidfd)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, status: socket.socket, argv: list[str]
    ) -> None:
        self._proc = proc
        self.argv = argv
        """The whole command line: the namespaces, the launcher, QEMU."""
        self._status: socket.socket | None = status
        self.qemu_pid: int | None = None
        self.start_time: int | None = None
        self._pidfd: int | None = None

    @property
    def pid(self) -> int:
        return self.qemu_pid if self.qemu_pid is not None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        code = await self._proc.wait()
        self._close()
        return code

    def send_signal(self, sig: int) -> None:
        if self._proc.returncode is not None:
            return
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)
        else:  # QEMU's pid is not known yet: unshare's death kills the launcher (--kill-child)
            self._proc.send_signal(sig)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._status is not None:
            self._status.close()
            self._status = None

    async def ready(
        self,
        argv: list[str],
        *,
        on_pid: Callable[[int, int], object] | None = None,
        timeout: float = STATUS_TIMEOUT_S,
    ) -> None:
        """Read the launcher's status until it execs QEMU; LaunchError if a step failed.

        ``on_pid`` gets QEMU's host pid and start time as soon as they are known (checked)."""
        assert self._status is not None
        reader, writer = await asyncio.open_unix_connection(sock=self._status)
        self._status = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = (await reader.readline()).decode(errors="replace").strip()
                    if not line:
                        code = await self._proc.wait()
                        raise LaunchError(
                            f"the jail's launcher exited with code {code} before QEMU started "
                            "(qemu.log says why)",
                            argv,
                            code,
                            "",
                        )
                    if self._take(line, argv):
                        return
                    if on_pid is not None and self.qemu_pid is not None and self.start_time:
                        on_pid(self.qemu_pid, self.start_time)
                        on_pid = None
        except TimeoutError:
            raise LaunchError(
                f"the jail's launcher did not start QEMU within {timeout:.0f} s", argv, None, ""
            ) from None
        finally:
            writer.close()

    def _take(self, line: str, argv: list[str]) -> bool:
        """Handle one status line; True once QEMU is being exec'd."""
        word, _, rest = line.partition(" ")
        if word == "pid":
            pid, start = (int(v) for v in rest.split())
            self._track(pid, start, argv)
            return False
        if word == "ok":
            if self._pidfd is None:
                raise LaunchError("the jail's launcher is gone already", argv, None, "")
            return True
        raise LaunchError(f"the jail failed at {rest or line}", argv, None, "")

    def _track(self, pid: int, start: int, argv: list[str]) -> None:
        """Bind a pidfd to the reported process, and check it is the one that reported.

        A launcher that is gone already failed a step: its status line follows (an exit
        before ``ok`` is reported as such), so nothing is tracked and nothing raised here."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        if proc_start_time(pid) != start:
            os.close(fd)
            return
        self._pidfd, self.qemu_pid, self.start_time = fd, pid, start


async def start(
    argv: list[str],
    config: JailConfig,
    fds: dict[int, int],
    *,
    prefix: list[str],
    log_fd: int,
    new_session: bool,
) -> JailedProcess:
    """Spawn ``prefix`` + the launcher with ``config``; it execs QEMU's ``argv``.

    Await :meth:`JailedProcess.ready` next; whatever it raises, the process is returned first
    so that the caller can kill and reap it.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        config.fds = [[src, dst] for src, dst in fds.items()]
        ours.sendall(config.encode())
        full = [*prefix, *launcher_argv(theirs.fileno()), *argv]
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fd,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=new_session,
            pass_fds=(theirs.fileno(), *fds),
            env={},
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return JailedProcess(proc, ours, full)
