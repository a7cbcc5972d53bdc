"""Boot and ``main``: the agent as PID 1 of the guest.

At boot the agent locks the workload out of what it trusts (:func:`harden`): its port, the
transfer-window disk and every other virtio disk, and the console become root-only; the agent
makes itself non-dumpable (so no other uid may ptrace it, pidfd_getfd its fds or read its
memory) and drops supplementary groups. Then it finds its port by name and serves it.
"""

from __future__ import annotations

import os
import sys
import time

from warden.guest import users
from warden.guest.agent import Agent
from warden.guest.log import log, log_exception

PORT_NAME = "org.warden.agent.0"
VIRTIO_PORTS = "/sys/class/virtio-ports"
PORT_WAIT = 10.0
"""How long to wait for the virtio port to appear at boot."""
RB_POWER_OFF = 0x4321FEDC
"""reboot(2) command. QEMU runs with -no-reboot, so a reboot ends it (poweroff may be unwired)."""
PR_SET_DUMPABLE = 4
PRIVATE_DEVICES = ("vport", "vd", "ttyS", "hvc", "console")
"""Prefixes of the /dev nodes only root may open: the agent's port, the disks (the rootfs and
the transfer window) and the consoles (the host keeps the console log)."""
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def harden(dev: str = "/dev") -> None:
    """Make the agent's devices root-only and the agent non-dumpable (PID 1 in a guest)."""
    try:
        names = os.listdir(dev)
    except OSError as exc:
        log(f"cannot list {dev}: {exc}")
        names = []
    for name in names:
        if name.startswith(PRIVATE_DEVICES):
            try:
                os.chown(f"{dev}/{name}", 0, 0, follow_symlinks=False)
                os.chmod(f"{dev}/{name}", 0o600, follow_symlinks=False)
            except (OSError, NotImplementedError) as exc:
                log(f"cannot make {dev}/{name} root-only: {exc}")
    set_not_dumpable()
    guard_signals()
    users.clear_groups()


def guard_signals() -> None:
    """Give PID 1 a do-nothing handler for every signal whose default action would end it.

    The exec thread briefly has the user's real uid while it starts a command
    (users.spawning_as), so the user may signal that thread then, and CPython blocks every
    signal in it around vfork. The kernel drops a signal sent to init from inside the guest only
    if init has no handler *and the target thread does not block it*; a blocked one is queued,
    and one whose default action is fatal then ends the whole thread group: init, so the guest
    panics (seen here with SIGTERM, SIGINT and SIGUSR1). With a handler, such a signal just runs
    the handler on the main thread. A command gets default actions again when it execs.
    SIGKILL and SIGSTOP are never delivered to init from inside the guest, and signals whose
    default action is to ignore or to stop need nothing.
    """
    import signal

    def ignore(signum: int, frame: object) -> None:
        return None

    leave = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT, signal.SIGURG}
    leave |= {signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
    for sig in signal.valid_signals():
        if sig not in leave and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, ignore)
    _ignore_reserved_signal(SIGCANCEL)


SIGCANCEL = 32
"""glibc's thread-cancellation signal: glibc's sigaction() refuses it, and its default is fatal."""
_SYS_RT_SIGACTION = 13  # x86_64
_SIG_IGN = 1


def _ignore_reserved_signal(sig: int) -> None:
    """Set a signal that glibc reserves (so Python cannot) to SIG_IGN with rt_sigaction(2)."""
    import ctypes

    action = (ctypes.c_ulong * 4)(_SIG_IGN, 0, 0, 0)  # handler, flags, restorer, mask
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_RT_SIGACTION, sig, ctypes.byref(action), None, 8) != 0:
        log(f"cannot ignore signal {sig}: errno {ctypes.get_errno()}")


def set_not_dumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")


def find_port() -> str | None:
    try:
        names = os.listdir(VIRTIO_PORTS)
    except OSError:
        return None
    for entry in sorted(names):
        try:
            with open(f"{VIRTIO_PORTS}/{entry}/name", encoding="utf-8") as f:
                if f.read().strip() == PORT_NAME:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


def open_port() -> int:
    deadline = time.monotonic() + PORT_WAIT
    while True:
        device = find_port()
        if device is not None:
            try:
                return os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot open {device}: {exc}") from exc
        elif time.monotonic() > deadline:
            raise RuntimeError(f"no virtio port named {PORT_NAME} under {VIRTIO_PORTS}")
        time.sleep(0.05)


def freshen(seed: object, host_time: object) -> None:
    """Mix the host's seed into the kernel's entropy pool, reseed it, and set the clock.

    A VM restored from a boot snapshot starts with the RNG state and the clock of the moment
    the snapshot was taken, as does every other VM restored from it. The host sends a fresh
    seed and the time with every HELLO, and they are applied before any request runs.
    """
    if isinstance(host_time, int | float):
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(host_time))
        except OSError as exc:
            log(f"clock_settime failed: {exc}")
    if isinstance(seed, str):
        try:
            import fcntl
            import struct

            data = bytes.fromhex(seed)
            fd = os.open("/dev/random", os.O_WRONLY)
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            log(f"reseeding the RNG failed: {exc}")


def power_off() -> None:
    """Sync and end the VM. Only returns when the agent is not PID 1."""
    os.sync()
    if os.getpid() != 1:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(RB_POWER_OFF)
        log(f"reboot(2) failed: errno {ctypes.get_errno()}")
    except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
        log_exception("reboot")
    try:
        with open("/proc/sysrq-trigger", "w", encoding="ascii") as f:
            f.write("b")
    except OSError:
        pass
    os._exit(0)  # PID 1 exiting panics the kernel, and panic=-1 reboots: QEMU ends either way


_USAGE = "usage: python -m warden.guest [--fd N | --listen PATH] [--user-home DIR]"


def _local_options(args: list[str]) -> list[str] | None:
    """Apply ``--user-home DIR`` (tests on a host); the other arguments, or None if bad."""
    if len(args) >= 2 and args[-2] == "--user-home":
        users.set_user_home(args[-1])
        return args[:-2]
    return None if "--user-home" in args else args


def main(argv: list[str] | None = None) -> None:
    args = _local_options(sys.argv[1:] if argv is None else argv)
    if args is not None and len(args) == 2 and args[0] == "--fd" and args[1].isdigit():
        fd = int(args[1])
        os.set_inheritable(fd, False)
        users.clear_groups()
        Agent().serve_fd(fd, reconnect=False)
    elif args is not None and len(args) == 2 and args[0] == "--listen":
        users.clear_groups()
        Agent().serve_listen(args[1])
    elif args == []:
        _serve_guest()
    else:
        sys.stderr.write(_USAGE + "\n")
        sys.exit(2)


def _serve_guest() -> None:
    """PID 1: harden, serve the port until a shutdown request, power off."""
    try:
        if os.getpid() == 1:
            harden()
        port = open_port()
        Agent().serve_port(port)
    except BaseException:
        log_exception("main")
        if os.getpid() != 1:
            raise
    power_off()


if __name__ == "__main__":
    main()
