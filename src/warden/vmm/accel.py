"""Choose the accelerator. KVM is used only where a probe boot proved it works on this host.

Nested KVM is broken on some hosts: ``/dev/kvm`` opens and the VM is created, but a Linux guest
hangs right after decompression. So ``auto`` boots the image's kernel once under KVM with
``warden.mode=probe`` and a deadline, and caches the verdict per host (keyed by boot id, QEMU
version and kernel hash). Everything else runs under TCG.

On our own machines ``/dev/kvm`` is PVM's (module ``kvm_pvm``, "Pagetable-based Virtual
Machine", github.com/virt-pvm/linux): a KVM without VMX for nested clouds, which runs only guest
kernels built for it (Kata ships one as ``vmlinux.pvm``). Debian's kernel is not one, hence the
hang; the probe's verdict says so (:func:`kvm_flavour`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from warden._errors import HostError
from warden.config import PRIVATE_FILE, Paths, open_private, private_dir, write_private
from warden.seal.facts import HostFacts
from warden.vmm.argv import BootFiles, RuntimeFiles, build_argv
from warden.vmm.spec import VMSpec

PROBE_DEADLINE_S = 8.0
PROBE_MARKER = b"WARDEN-PROBE-OK"


@dataclass(frozen=True)
class AccelChoice:
    name: Literal["kvm", "tcg"]
    reason: str


@functools.cache
def qemu_version(qemu: str, cache_dir: Path | None = None) -> str:
    """The first line of ``qemu --version``; with ``cache_dir``, remembered there under the
    binary's stat (``seal/facts.py``: one subprocess less per launch)."""
    if cache_dir is None:
        return _run_version(qemu)
    real = os.path.realpath(shutil.which(qemu) or qemu)
    return HostFacts(cache_dir).get(f"qemu-version {real}", lambda: _run_version(qemu), _one(real))


def _one(path: str) -> Callable[[str], list[str]]:
    return lambda _: [path]


def _run_version(qemu: str) -> str:
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except FileNotFoundError:
        raise HostError(
            f"{qemu} is not installed; run `apt-get install qemu-system-x86` (or `make setup`)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise HostError(f"`{qemu} --version` failed: {exc.stderr.strip()}") from None
    return out.splitlines()[0] if out else "unknown"


def kvm_usable_device() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened ({exc.strerror})"
    os.close(fd)
    return None


def kvm_flavour(sys_module: Path = Path("/sys/module")) -> str | None:
    """What is unusual about this host's KVM, or None: PVM (``kvm_pvm`` loaded) runs only
    guest kernels built for PVM."""
    if (sys_module / "kvm_pvm").is_dir():
        return (
            "this host's KVM is PVM (module kvm_pvm), which runs only guest kernels built for "
            "PVM (github.com/virt-pvm/linux; Kata's vmlinux.pvm), not Debian's"
        )
    return None


def _why_tcg(what: str) -> str:
    """A probe's failure, with what this host's KVM is if that explains it."""
    flavour = kvm_flavour()
    return f"{what} ({flavour}); using TCG" if flavour else f"{what}; using TCG"


def resolve_accel(
    requested: str, paths: Paths, boot: BootFiles, kernel_sha256: str, qemu: str
) -> AccelChoice:
    """Resolve ``auto``/``kvm``/``tcg`` to what this host can really run."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested tcg")
    verdict = probe_kvm(paths, boot, kernel_sha256, qemu)
    if verdict.name == "kvm":
        return verdict
    if requested == "kvm":
        raise HostError(
            f"accel='kvm' was requested but KVM is unusable here: {verdict.reason}; "
            "use accel='auto' or 'tcg'"
        )
    return verdict


def probe_kvm(paths: Paths, boot: BootFiles, kernel_sha256: str, qemu: str) -> AccelChoice:
    """The cached verdict of a KVM probe boot for this host, probing once if needed."""
    why_not = kvm_usable_device()
    if why_not is not None:
        return AccelChoice("tcg", f"{why_not}; using TCG")
    key = _cache_key(qemu, kernel_sha256, paths.cache)
    private_dir(paths.cache)
    cache_file = paths.cache / "accel-probe.json"
    lock_fd = open_private(paths.cache / ".accel.lock", os.O_RDWR | os.O_CREAT)
    with os.fdopen(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # made readable by all by an older warden
            os.chmod(cache_file, PRIVATE_FILE)
        cached = _read_cache(cache_file).get(key)
        if cached is not None:
            return AccelChoice(cached["name"], cached["reason"] + " (cached probe)")
        choice = _probe(boot, qemu)
        entries = _read_cache(cache_file)
        entries[key] = asdict(choice)
        write_private(cache_file, json.dumps(entries, indent=1).encode())
    return choice


def _cache_key(qemu: str, kernel_sha256: str, cache_dir: Path) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    raw = "\n".join([boot_id, os.uname().release, qemu_version(qemu, cache_dir), kernel_sha256])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, dict[str, Literal["kvm", "tcg"]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _probe(boot: BootFiles, qemu: str) -> AccelChoice:
    spec = VMSpec(memory_mib=128, vcpus=1)
    with tempfile.TemporaryDirectory(prefix="warden-probe-") as tmp:
        run = RuntimeFiles(Path(tmp))
        # The argv names every VM's devices, the transfer window's disk included: QEMU refuses
        # to start without its file (before this, every probe failed so and KVM was never used).
        run.xfer.touch(mode=0o600)
        argv = build_argv(spec, boot, run, accel="kvm", qemu=qemu, mode="probe")
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _, err = proc.communicate(timeout=PROBE_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return AccelChoice(
                "tcg",
                _why_tcg(
                    f"a probe boot under KVM did not reach init within {PROBE_DEADLINE_S:.0f} s"
                ),
            )
        elapsed = time.monotonic() - start
        console = run.console.read_bytes() if run.console.exists() else b""
        if PROBE_MARKER in console:
            return AccelChoice("kvm", f"a probe boot under KVM reached init in {elapsed:.2f} s")
        detail = err.decode(errors="replace").strip().splitlines()
        return AccelChoice(
            "tcg",
            _why_tcg(
                f"a probe boot under KVM failed (exit {proc.returncode}: "
                f"{detail[-1] if detail else 'no output'})"
            ),
        )
