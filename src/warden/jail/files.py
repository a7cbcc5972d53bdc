"""What a jailed QEMU needs in its root besides the VM's own files: its binary, the shared
libraries the dynamic loader resolves for it, the TCG accelerator module (Debian builds TCG as
a module) and its libraries, and the microvm firmware. All are bound read-only.

Found once per QEMU binary and process (two runs of the dynamic loader, about 10 ms), and
remembered across processes under the stat of every file found (``seal/facts.py``).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from warden._errors import HostError
from warden.seal.facts import HostFacts

FIRMWARE = ("bios-microvm.bin",)
"""What QEMU's microvm machine loads from its data dir (``x-option-roms=off``: no option ROM)."""

LD_CACHE = Path("/etc/ld.so.cache")


def qemu_files(qemu: str, accel: str, cache_dir: Path | None = None) -> tuple[str, ...]:
    """Every host file QEMU at ``qemu`` opens to run a VM under ``accel`` (kvm or tcg); with
    ``cache_dir``, remembered there while none of them changes."""
    real = os.path.realpath(qemu)
    st = os.stat(real)
    if cache_dir is None:
        return _closure(real, st.st_ino, st.st_mtime_ns, accel)

    def learn() -> list[str]:
        return list(_closure(real, st.st_ino, st.st_mtime_ns, accel))

    facts = HostFacts(cache_dir)
    return tuple(facts.get(f"qemu-files {accel} {real}", learn, lambda files: files))


@functools.cache
def _closure(qemu: str, ino: int, mtime_ns: int, accel: str) -> tuple[str, ...]:
    files = {qemu, *_libraries(qemu)}
    prefix = Path(qemu).parent.parent  # /usr for /usr/bin/qemu-system-x86_64
    loader = next((f for f in files if "/ld-linux" in f), None)
    if accel == "tcg":
        arch = Path(qemu).name.removeprefix("qemu-system-")
        for module in sorted(prefix.glob(f"lib/*/qemu/accel-tcg-{arch}.so")):
            files.add(str(module))
            if loader is not None:
                files.update(_libraries(str(module), loader))
    for name in FIRMWARE:
        path = prefix / "share" / "qemu" / name
        if not path.exists():
            raise HostError(f"QEMU's firmware {path} is missing; reinstall qemu-system-x86")
        files.add(str(path))
    if LD_CACHE.exists():
        files.add(str(LD_CACHE))
    return tuple(sorted(files))


def _libraries(binary: str, loader: str | None = None) -> list[str]:
    """The shared libraries of ``binary`` as the dynamic loader resolves them (``ldd``'s way:
    ``LD_TRACE_LOADED_OBJECTS`` makes the loader list them without running the program)."""
    argv = [loader, "--list", binary] if loader else [binary]
    try:
        out = subprocess.run(
            argv,
            env={"LD_TRACE_LOADED_OBJECTS": "1"},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostError(f"could not list the libraries of {binary}: {exc}") from None
    found: list[str] = []
    for line in out.splitlines():
        # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        words = [w for w in line.split() if w.startswith("/")]
        if words:
            found.append(words[0])
    return found
