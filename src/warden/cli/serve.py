"""``warden serve``: run the manager daemon on a unix socket, and optionally on TCP (TLS and a
bearer token: ``server/run.py``).

The socket is ``$WARDEN_HOME/api/warden.sock``. When the host has the daemon's group (``--group``,
default ``warden``), it is ``0660 root:<group>``, ``api/`` ``0750`` and ``$WARDEN_HOME`` ``0710``
(pass, not list), both of that group, so that its members reach it and nothing else
(``auth/unix.py``); without the group, the socket is 0600 and both dirs 0700.

SIGTERM or SIGINT stop it gracefully: it stops accepting connections, lets in-flight requests
finish (up to a grace period), and exits leaving every VM running for the next daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from warden._errors import HostError, SpecError, WardenError
from warden.auth.unix import DEFAULT_GROUP, group_id, open_socket_dir
from warden.cli._console import err
from warden.config import Paths, private_dir
from warden.policy.admission import AdmissionPolicy
from warden.server import logs

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from warden.server.run import TcpListener

LOCK_NAME = "manager.lock"


def default_socket(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).socket


SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help="Unix socket to listen on [default: $WARDEN_HOME/api/warden.sock]. With --group, "
        "the dirs on another path are yours to open to the group.",
    ),
]
GroupOption = Annotated[
    str,
    typer.Option(
        "--group",
        help="If the host has this group, its members may use the socket (0660 root:GROUP), "
        "as the role 'user': what the policy grants, never root's powers. '' keeps it 0600.",
    ),
]
LogLevelOption = Annotated[str, typer.Option("--log-level", help="debug, info, warning.")]
LogFormatOption = Annotated[
    str, typer.Option("--log-format", help="text (for people) or json (one object a line).")
]
MemoryOvercommitOption = Annotated[
    float,
    typer.Option(
        "--memory-overcommit",
        help="Admit the memory VMs are charged (see --charge) up to this multiple of host "
        "memory minus --reserved-memory.",
    ),
]
VcpuOvercommitOption = Annotated[
    float,
    typer.Option(
        "--vcpu-overcommit",
        help="Admit the vCPUs VMs are charged (see --charge) up to this multiple of host CPUs.",
    ),
]
ChargeOption = Annotated[
    str,
    typer.Option(
        "--charge",
        help="measured: charge each VM its measured PSS + --vm-headroom and its measured CPU "
        "load (a VM not measured yet: the calibrated footprint, all of its vCPUs; a paused "
        "one: no CPU); limits: its guest memory + QEMU overhead and all of its vCPUs.",
    ),
]
FootprintOption = Annotated[
    int | None,
    typer.Option(
        "--vm-footprint",
        metavar="MIB",
        help="The PSS charged to a VM not measured yet [default: calibrated by booting one at "
        "start-up, kept in $WARDEN_HOME/footprint.json; `warden doctor` shows it].",
        min=1,
    ),
]
HeadroomOption = Annotated[
    int,
    typer.Option(
        "--vm-headroom",
        metavar="MIB",
        help="Memory charged per VM on top of its measured PSS (room to grow between samples).",
        min=0,
    ),
]
CpuBusyOption = Annotated[
    float,
    typer.Option(
        "--cpu-busy-limit",
        help="Refuse creates while the VMs' measured CPU load passes this fraction of the "
        "host's CPUs (--charge measured).",
    ),
]
ReservedMemoryOption = Annotated[
    int,
    typer.Option("--reserved-memory", help="Host memory in MiB never handed to VMs.", min=0),
]
TcpOption = Annotated[
    str | None,
    typer.Option(
        "--tcp",
        metavar="HOST:PORT",
        help="Also listen on TCP, with TLS and a bearer token (both made on first use, "
        "under $WARDEN_HOME): e.g. 127.0.0.1:8443.",
    ),
]
RequireJailOption = Annotated[
    bool,
    typer.Option(
        "--require-jail",
        help="Refuse to start if this host lacks a jail feature (`warden doctor` lists them), "
        "and refuse every create that would run in a partial jail; without it a missing "
        "feature is a logged downgrade.",
    ),
]
PoolOption = Annotated[
    list[str] | None,
    typer.Option(
        "--pool",
        metavar="TEMPLATE=K",
        help="Keep K warmed-up clones of TEMPLATE ready for creates (repeatable; K=0 turns a "
        "pool off). Default: default=2, once a template named 'default' exists.",
    ),
]
AutoPauseOption = Annotated[
    float,
    typer.Option(
        "--auto-pause",
        metavar="SECONDS",
        min=0,
        help="Stop a VM's vCPUs (QMP stop: no CPU, memory kept) once it has had no request in "
        "flight for this long; the next request continues it first. Work the guest does on "
        "its own is frozen meanwhile. 0 (the default) never stops a VM.",
    ),
]
AllowRootOption = Annotated[
    bool,
    typer.Option(
        "--allow-root",
        help="Deprecated: grant the access policy's exec-as-root action to every caller "
        '(a request with "user": "root" still needs exec or files-*, and a deny rule still '
        "wins). Grant exec-as-root in $WARDEN_HOME/policy.toml instead.",
    ),
]


def serve(
    socket_path: SocketOption = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
    memory_overcommit: MemoryOvercommitOption = AdmissionPolicy.memory_overcommit,
    vcpu_overcommit: VcpuOvercommitOption = AdmissionPolicy.vcpu_overcommit,
    reserved_memory: ReservedMemoryOption = AdmissionPolicy.reserved_host_memory_mib,
    charge: ChargeOption = AdmissionPolicy.charge,
    vm_footprint: FootprintOption = None,
    vm_headroom: HeadroomOption = AdmissionPolicy.vm_headroom_mib,
    cpu_busy_limit: CpuBusyOption = AdmissionPolicy.cpu_busy_limit,
    tcp: TcpOption = None,
    allow_root: AllowRootOption = False,
    require_jail: RequireJailOption = False,
    pool: PoolOption = None,
    auto_pause: AutoPauseOption = 0.0,
    group: GroupOption = DEFAULT_GROUP,
) -> None:
    """Run the manager daemon: it holds the VMs and serves the REST API on a unix socket.

    Admission control refuses a create (HTTP 409) that would pass the memory or vcpu limit,
    or while the VMs keep the host's CPUs busy; `warden info` shows the capacity, the limits
    and what the VMs are charged. Workloads run as
    the guest's unprivileged user unless a request asks for root and the access policy
    ($WARDEN_HOME/policy.toml, or the shipped default) grants it exec-as-root. A bad policy
    file refuses the start, saying which line or key to fix.
    """
    _setup_logs(log_level, log_format)
    pools = _pools(pool or [])
    policy = _policy(
        memory_overcommit=memory_overcommit,
        vcpu_overcommit=vcpu_overcommit,
        reserved_host_memory_mib=reserved_memory,
        charge=charge,
        vm_footprint_mib=vm_footprint,
        vm_headroom_mib=vm_headroom,
        cpu_busy_limit=cpu_busy_limit,
    )
    paths = Paths.from_env()
    _check_policy(paths)
    if require_jail:
        _require_jail(paths)
    policy = _calibrated(paths, policy)
    path = socket_path or default_socket(paths)
    gid = group_id(group) if group else None
    lock, sock, listener = _listen(paths, path, tcp, gid)
    try:
        from warden.server import run

        daemon = run.serve(
            paths, sock, log_level, policy, listener,
            allow_root=allow_root, pools=pools, auto_pause_s=auto_pause or None,
            group=group or None,
        )  # fmt: skip
        _run_until_stopped(daemon)
    finally:
        _close(lock, sock, listener, path)


def _setup_logs(log_level: str, log_format: str) -> None:
    """Set up the daemon's logging (a usage error for an unknown ``--log-format``)."""
    if log_format not in logs.FORMATS:
        raise typer.BadParameter(
            f"{log_format!r} is not one of {', '.join(logs.FORMATS)}", param_hint="'--log-format'"
        )
    logs.setup(log_level, log_format)


def _run_until_stopped(daemon: Coroutine[Any, Any, None]) -> None:
    """Run the daemon until SIGTERM or SIGINT has stopped it gracefully."""
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers
    # that is a no-op, so `serve` returns and removes its socket instead of dying by it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    asyncio.run(daemon)


def _close(lock: int, sock: socket.socket, listener: TcpListener | None, path: Path) -> None:
    """Undo what ``_listen`` did: close the sockets, remove the unix one, drop the lock."""
    sock.close()
    if listener is not None:
        listener.sock.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(lock)


def _pools(pairs: list[str]) -> dict[str, int]:
    """The warm pools' sizes of ``--pool`` (a usage error says what is wrong)."""
    from warden.server.pool import parse_sizes

    try:
        return parse_sizes(pairs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--pool'") from None


def _check_policy(paths: Paths) -> None:
    """Refuse to start (exit 1, saying what to fix) if $WARDEN_HOME/policy.toml is bad."""
    from warden.policy.access import load_policy

    try:
        load_policy(paths)
    except WardenError as exc:
        from rich.text import Text  # the message quotes TOML: [[rules]] is not markup

        err().print(Text("warden: ", style="red") + Text(str(exc)))
        raise typer.Exit(1) from None


def _require_jail(paths: Paths) -> None:
    """Make every VM of this daemon need the whole jail; refuse to start (exit 1, saying what
    is missing) if this host lacks any of it. Checked against the default image's files;
    each create checks its own image again."""
    from warden.image.store import load_image
    from warden.jail import features
    from warden.jail.policy import set_default_mode
    from warden.vmm.machine import QEMU_BINARY

    set_default_mode("require")
    qemu = shutil.which(QEMU_BINARY)
    try:
        if qemu is None:
            raise HostError(f"QEMU ({QEMU_BINARY}) is not installed")
        image = load_image(paths, "default")
        host = features.detect(paths, qemu, image.kernel.path)
        features.JailPlan.from_features(host).refuse_if_incomplete()
    except WardenError as exc:
        _print_error(exc)
        raise typer.Exit(1) from None


def _calibrated(paths: Paths, policy: AdmissionPolicy) -> AdmissionPolicy:
    """``policy`` with the footprint of an idle VM (``charge="measured"``): given, saved in
    $WARDEN_HOME, or measured now by booting a VM before the daemon listens (~2 s, once per
    image and QEMU). If that fails, VMs not measured yet are charged their limits."""
    import dataclasses
    import logging

    from warden.policy import footprint

    if policy.charge != "measured" or policy.vm_footprint_mib is not None:
        return policy
    found = footprint.load(paths)
    if found is None:
        try:
            found = asyncio.run(footprint.measure(paths))
        except WardenError as exc:
            logging.getLogger("warden.serve").warning(
                "could not calibrate the footprint of an idle VM (%s): admission charges VMs "
                "not measured yet their limits",
                exc,
            )
            return policy
    return dataclasses.replace(policy, vm_footprint_mib=found.pss_mib)


def _print_error(exc: WardenError) -> None:
    err().print(f"[red]warden:[/red] {exc}", highlight=False)


def _policy(**options: Any) -> AdmissionPolicy:
    """The admission policy of the options; exit 2 if they make no sense."""
    try:
        return AdmissionPolicy(**options)
    except SpecError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


def _listen(
    paths: Paths, path: Path, tcp: str | None, gid: int | None
) -> tuple[int, socket.socket, TcpListener | None]:
    """Take the daemon's lock, bind the unix socket ``path`` (for group ``gid``, if any), and
    listen on ``tcp`` if given.

    On failure: say why, undo what was done, and exit 1."""
    try:
        lock = _lock(paths)
    except WardenError as exc:
        _print_error(exc)
        raise typer.Exit(1) from None
    from warden.server import run

    try:
        if path == paths.socket:
            _open_socket_dir(paths, gid)
        sock = _bind(path, gid)
    except WardenError as exc:
        _print_error(exc)
        os.close(lock)
        raise typer.Exit(1) from None
    listener: run.TcpListener | None = None
    try:
        if tcp is not None:
            listener = run.listen_tcp(paths, tcp)
    except WardenError as exc:
        _print_error(exc)
        sock.close()
        path.unlink(missing_ok=True)
        os.close(lock)
        raise typer.Exit(1) from None
    return lock, sock, listener


def _lock(paths: Paths) -> int:
    """One daemon per $WARDEN_HOME: hold an exclusive lock for our whole life."""
    private_dir(paths.run)
    fd = os.open(paths.run / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise WardenError(
                f"another warden daemon is running for {paths.home}; stop it first"
            ) from None
        raise
    return fd


def _open_socket_dir(paths: Paths, gid: int | None) -> None:
    try:
        open_socket_dir(paths.api, gid)
    except OSError as exc:
        raise WardenError(
            f"cannot open {paths.api} to group {gid}: {exc.strerror or exc} (run the daemon "
            "as root, or --group '')"
        ) from None


def _bind(path: Path, gid: int | None = None) -> socket.socket:
    """Bind the unix socket with mode 0600 (0660 and group ``gid`` with one), replacing a
    stale one (nobody answering)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that was killed
        else:
            raise WardenError(f"something already listens on {path}; is a daemon running?")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, 0o600 if gid is None else 0o660)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise WardenError(f"cannot give {path} to group {gid}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _ignore(signum: int, frame: object) -> None:
    pass
