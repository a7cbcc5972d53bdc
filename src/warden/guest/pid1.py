"""Boot and ``main``: the agent as PID 1 of the guest.

At boot the agent locks the workload out of what it trusts (:func:`harden`): its port, the
transfer-window disk and every other virtio disk, and the console become root-only; the agent
makes itself non-dumpable (so no other uid may ptrace it, pidfd_getfd its fds or read its
memory) and drops supplementary groups. Then it finds its port by name and serves it.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

from warden.guest import openssl, users
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
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""A hostname the agent takes from the host: one DNS label (RFC 1123)."""


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


def freshen(seed: object, host_time: object, hostname: object = None) -> None:
    """Mix the host's seed into the kernel's entropy pool, reseed it, set the clock and the
    hostname.

    A VM restored from a boot snapshot or cloned from a template starts with the RNG state,
    the clock and the hostname of the moment the snapshot was taken, as does every other VM
    restored from it. The host sends a fresh seed, the time and the VM's hostname with every
    HELLO, and they are applied before any request runs.
    """
    if isinstance(hostname, str) and HOSTNAME_RE.match(hostname):
        try:
            socket.sethostname(hostname)
        except OSError as exc:
            log(f"sethostname failed: {exc}")
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


_USAGE = (
    "usage: python -m warden.guest [--fd N | --listen PATH] [--user-home DIR] [--secret-file FILE]"
)


def _local_options(args: list[str]) -> tuple[list[str], bytes | None] | None:
    """Apply ``--user-home DIR`` and read ``--secret-file FILE`` (runs on a host, for tests):
    the other arguments and the channel secret, or None if an option is bad."""
    secret: bytes | None = None
    rest: list[str] = []
    pairs = iter(args)
    for arg in pairs:
        if arg not in ("--user-home", "--secret-file"):
            rest.append(arg)
            continue
        value = next(pairs, None)
        if value is None:
            return None
        if arg == "--user-home":
            users.set_user_home(value)
        else:
            with open(value, "rb") as f:
                secret = f.read()
            if len(secret) != SECRET_SIZE:
                return None
    return rest, secret


def main(argv: list[str] | None = None) -> None:
    parsed = _local_options(sys.argv[1:] if argv is None else argv)
    args, secret = parsed if parsed is not None else (None, None)
    if args is not None and len(args) == 2 and args[0] == "--fd" and args[1].isdigit():
        fd = int(args[1])
        os.set_inheritable(fd, False)
        users.clear_groups()
        Agent(secret).serve_fd(fd, reconnect=False)
    elif args is not None and len(args) == 2 and args[0] == "--listen":
        users.clear_groups()
        Agent(secret).serve_listen(args[1])
    elif args == [] and secret is None:
        _serve_guest()
    else:
        sys.stderr.write(_USAGE + "\n")
        sys.exit(2)


# -- the channel's secret and the kernel command line

SECRET_PATH = "/sys/firmware/qemu_fw_cfg/by_name/opt/warden/key/raw"  # noqa: S105 - a path, not a secret
"""The VM's channel secret: the host's ``-fw_cfg name=opt/warden/key`` (mode 0400, root)."""
SECRET_SIZE = 32
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
"""Where Debian's python3-cryptography lives."""


def boot_options(cmdline: str) -> dict[str, str]:
    """The ``warden.NAME=VALUE`` options of the kernel command line."""
    options: dict[str, str] = {}
    for word in cmdline.split():
        name, sep, value = word.partition("=")
        if sep and name.startswith("warden."):
            options[name[len("warden.") :]] = value
    return options


def read_secret() -> bytes:
    """The channel secret that the host put in fw_cfg. RuntimeError if it is missing."""
    try:
        with open(SECRET_PATH, "rb") as f:
            secret = f.read(SECRET_SIZE + 1)
    except OSError as exc:
        raise RuntimeError(
            f"no channel secret at {SECRET_PATH} ({exc.strerror}): the host must start QEMU "
            "with -fw_cfg name=opt/warden/key, and the image must load qemu_fw_cfg (rebuild "
            "it with `warden image build`)"
        ) from None
    if len(secret) != SECRET_SIZE:
        raise RuntimeError(f"the channel secret is {len(secret)} bytes, not {SECRET_SIZE}")
    return secret


def load_crypto() -> None:
    """Load ``cryptography`` now (libcrypto is loaded already: ``hashlib`` links it, with the
    scalar code under TCG, see :mod:`.openssl`), and the channel's EVP records."""
    if DIST_PACKAGES not in sys.path:  # the agent runs with -S: no site, no dist-packages
        sys.path.append(DIST_PACKAGES)
    try:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        del ChaCha20Poly1305
    finally:
        os.environ.pop(openssl.VARIABLE, None)  # commands get no trace of it
    from warden.channel import noise

    if not noise.use_evp():  # the records through one EVP context per key (channel/evp.py)
        log("cannot load libcrypto with ctypes: the channel's records use cryptography")
    if not noise.use_sodium():  # the handshake on libsodium (channel/sodium.py)
        log("cannot load libsodium: the channel's handshake uses cryptography")


def mix_entropy(data: bytes) -> None:
    """Mix ``data`` into the kernel's RNG and reseed it (credits no entropy).

    Before each channel handshake, the agent mixes in the host's handshake message (its fresh
    ephemeral key): a VM restored from a snapshot has the same RNG state as its siblings
    until then, and its own ephemeral key must differ from theirs."""
    import fcntl
    import struct

    try:
        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 0, len(data)) + data)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"reseeding the RNG failed: {exc}")


def _guest_secret() -> bytes | None:
    """The channel secret of this VM; None if the host asked for a plaintext channel (only its
    benchmark does, with ``warden.channel=plain`` on the kernel command line)."""
    with open("/proc/cmdline", encoding="ascii", errors="replace") as f:
        options = boot_options(f.read())
    if options.get("channel") == "plain":
        log("the host asked for a plaintext channel (warden.channel=plain)")
        return None
    secret = read_secret()
    load_crypto()
    return secret


def _serve_guest() -> None:
    """PID 1: harden, serve the port until a shutdown request, power off."""
    try:
        if os.getpid() == 1:
            harden()
        secret = _guest_secret()
        port = open_port()
        Agent(secret, on_handshake=mix_entropy if os.getpid() == 1 else None).serve_port(port)
    except BaseException:
        log_exception("main")
        if os.getpid() != 1:
            raise
    power_off()


if __name__ == "__main__":
    main()
