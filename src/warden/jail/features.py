"""Which jail features this host has, and the jail a VM gets from them.

Each feature is tried for real once per host boot (and QEMU binary, and launcher version): the
launcher's ``--probe`` mounts, idmaps, pivots, switches uid and sets no_new_privs inside new
namespaces, and QEMU is started once with ``-sandbox``. The verdicts are cached in
``$WARDEN_HOME/cache/jail-probe.json`` (0600); ``warden doctor`` probes afresh. Whether warden
runs as root, the cgroups, and the uid range's users are checked on every launch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from warden._errors import JAIL_REFUSED, JailUnavailableError
from warden.config import PRIVATE_FILE, Paths, open_private, private_dir, write_private
from warden.jail import ids
from warden.vmm import argv as qemu_argv
from warden.vmm import cgroups

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("launcher.py")

UID = "uid range"
IDMAP = "idmapped mounts"
MOUNT = "mount ns"
PID = "pid ns"
NET = "net ns"
SECCOMP = "seccomp sandbox"
NNP = "no_new_privs"
CGROUPS = "cgroups"

FEATURES: dict[str, str] = {
    UID: f"QEMU runs as a uid and gid of its own ({ids.FIRST_UID}-"
    f"{ids.FIRST_UID + ids.COUNT - 1}), no supplementary groups, no capabilities",
    IDMAP: "the VM's uid reads its root-only image files through idmapped read-only binds",
    MOUNT: "a mount namespace; pivot_root into a root with only the VM's files and /dev nodes",
    PID: "a PID namespace: QEMU is its PID 1 and sees no other process",
    NET: "an empty network namespace: no interface but a down loopback",
    SECCOMP: f"QEMU's seccomp filter: -sandbox {qemu_argv.SANDBOX}",
    NNP: "no_new_privs: no exec can gain privileges",
    CGROUPS: "per-VM cgroups: memory, CPU and task limits, joined before QEMU runs",
}
"""Every jail feature and what it gives, in the order the doctor lists them."""

PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class HostFeatures:
    """What this host lacks: feature -> why (absent from ``missing`` means available)."""

    missing: dict[str, str] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        return feature not in self.missing

    def rows(self) -> list[tuple[str, bool, str]]:
        """(feature, available, detail) for every feature, in the doctor's order."""
        return [(f, self.has(f), self.missing.get(f, what)) for f, what in FEATURES.items()]


@dataclass(frozen=True)
class JailPlan:
    """The jail one VM gets: each feature used or not, and why not."""

    enabled: bool
    """Whether QEMU is started through the jail's launcher at all (warden must be root)."""
    uid: bool
    mount: bool
    pid: bool
    net: bool
    seccomp: bool
    nnp: bool
    cgroups: bool
    missing: dict[str, str]

    @classmethod
    def from_features(cls, host: HostFeatures) -> JailPlan:
        enabled = os.geteuid() == 0
        return cls(
            enabled=enabled,
            uid=enabled and all(host.has(f) for f in (UID, IDMAP, MOUNT)),
            mount=enabled and host.has(MOUNT),
            pid=enabled and host.has(PID),
            net=enabled and host.has(NET),
            seccomp=enabled and host.has(SECCOMP),
            nnp=enabled and host.has(NNP),
            cgroups=host.has(CGROUPS),
            missing=dict(host.missing),
        )

    def describe_missing(self) -> str:
        return "; ".join(f"{f}: {why}" for f, why in self.missing.items())

    def refuse_if_incomplete(self) -> None:
        """Raise JailUnavailableError naming each missing feature (``--require-jail``,
        ``require_jail=True``)."""
        if self.missing:
            raise JailUnavailableError(
                f"{JAIL_REFUSED} (--require-jail, require_jail=True) but this host lacks "
                f"{', '.join(self.missing)}: {self.describe_missing()}. Give the host what "
                "is missing (`warden doctor` lists every jail feature and checks it), or leave "
                "out the requirement to run in what jail the host has (each launch logs what "
                "is missing)"
            )


def require(paths: Paths, qemu: str, image_file: Path, *, use_cgroups: bool = True) -> None:
    """Raise JailUnavailableError if this host lacks any jail feature (a check before a VM is
    recorded or made; its launch checks again)."""
    host = detect(paths, qemu, image_file, use_cgroups=use_cgroups)
    JailPlan.from_features(host).refuse_if_incomplete()


def detect(
    paths: Paths, qemu: str, image_file: Path, *, use_cgroups: bool = True, fresh: bool = False
) -> HostFeatures:
    """This host's jail features; the namespaces, idmapped mounts and seccomp from the
    cached probe (``fresh``: probe again)."""
    if os.geteuid() != 0:
        why = "warden is not running as root (it needs root to build a jail)"
        return HostFeatures({f: why for f in FEATURES if f != CGROUPS} | _cgroups(use_cgroups))
    missing = _cached_probe(paths, qemu, image_file, fresh=fresh)
    clash = ids.conflicts()
    if clash:
        missing[UID] = f"warden's range is used by {', '.join(clash)}"
    return HostFeatures(missing | _cgroups(use_cgroups))


def _cgroups(use_cgroups: bool) -> dict[str, str]:
    if not use_cgroups:
        return {CGROUPS: "turned off for this VM by its caller"}
    why = cgroups.available()
    return {CGROUPS: why} if why else {}


def _cached_probe(paths: Paths, qemu: str, image_file: Path, *, fresh: bool) -> dict[str, str]:
    key = _cache_key(qemu, image_file)
    private_dir(paths.cache)
    cache_file = paths.cache / "jail-probe.json"
    lock_fd = open_private(paths.cache / ".jail-probe.lock", os.O_RDWR | os.O_CREAT)
    with os.fdopen(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_cache(cache_file)
        cached = entries.get(key)
        if cached is not None and not fresh:
            return dict(cached)
        result = probe(paths, qemu, image_file)
        entries[key] = result
        write_private(cache_file, json.dumps(entries, indent=1).encode())
    return dict(result)


def _cache_key(qemu: str, image_file: Path) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    real = os.path.realpath(qemu)
    parts = [
        boot_id,
        os.uname().release,
        real,
        str(os.stat(real).st_mtime_ns),
        str(os.stat(image_file).st_dev),
        hashlib.sha256(LAUNCHER.read_bytes()).hexdigest(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, dict[str, str]]:
    with contextlib.suppress(OSError):
        os.chmod(path, PRIVATE_FILE)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def probe(paths: Paths, qemu: str, image_file: Path) -> dict[str, str]:
    """Try every probed feature now; feature -> why it failed (only the failed ones)."""
    missing: dict[str, str] = {}
    unshare = shutil.which("unshare")
    if unshare is None:
        why = "unshare (util-linux) is not installed: apt-get install util-linux"
        missing.update({MOUNT: why, PID: why, NET: why})
    else:
        missing.update(_probe_namespaces(unshare))
    if MOUNT in missing:
        for feature in (IDMAP, UID):
            missing[feature] = f"needs the mount namespace ({missing[MOUNT]})"
        nnp = _probe_nnp()
        if nnp:
            missing[NNP] = nnp
    else:
        assert unshare is not None
        missing.update(_probe_launcher(paths, unshare, image_file))
    why = _probe_seccomp(qemu)
    if why:
        missing[SECCOMP] = why
    return missing


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        env={},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"


def _probe_namespaces(unshare: str) -> dict[str, str]:
    missing: dict[str, str] = {}
    for feature, flags in ((MOUNT, ["--mount"]), (PID, ["--pid", "--fork"]), (NET, ["--net"])):
        proc = _run([unshare, *flags, "true"])
        if proc.returncode != 0:
            missing[feature] = f"unshare {' '.join(flags)} failed ({_why(proc)})"
    return missing


def _probe_launcher(paths: Paths, unshare: str, image_file: Path) -> dict[str, str]:
    """The launcher's privileged steps in a throwaway mount namespace."""
    root = private_dir(paths.run / "jail")
    argv = [unshare, "--mount", sys.executable, "-I", "-S", str(LAUNCHER), "--probe"]
    proc = _run([*argv, str(root), str(image_file), str(ids.FIRST_UID)])
    try:
        steps: dict[str, str | None] = json.loads(proc.stdout)
    except ValueError:
        why = f"the jail launcher's probe failed ({_why(proc)})"
        return {MOUNT: why, IDMAP: why, UID: why, NNP: why}
    missing: dict[str, str] = {}
    for step, feature in (
        ("mount", MOUNT),
        ("pivot_root", MOUNT),
        ("idmap", IDMAP),
        ("uid", UID),
        ("no_new_privs", NNP),
    ):
        failed = steps.get(step)
        if failed and feature not in missing:
            missing[feature] = f"{step} failed: {failed}"
    if IDMAP in missing and UID not in missing:
        missing[UID] = f"the VM's uid could not read its image files ({missing[IDMAP]})"
    return missing


def _probe_nnp() -> str:
    proc = _run(["setpriv", "--no-new-privs", "true"])
    return "" if proc.returncode == 0 else f"setpriv --no-new-privs failed ({_why(proc)})"


def _probe_seccomp(qemu: str) -> str:
    """QEMU accepts the sandbox (it is built with seccomp, and the kernel has it)."""
    quit_ = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    argv = [qemu, "-M", "none", "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-sandbox", qemu_argv.SANDBOX, "-qmp", "stdio"]
    try:
        proc = subprocess.run(
            argv,
            input=quit_,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"QEMU with -sandbox did not start: {exc}"
    return "" if proc.returncode == 0 else f"QEMU refused -sandbox ({_why(proc)})"
