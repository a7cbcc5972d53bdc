"""Host tools the image build runs, and the one way to run them.

Every external command goes through :func:`run`: a list argv (never a shell), its output
captured, and a failure turned into :class:`ImageBuildError` with the tail of that output.
Missing tools raise :class:`HostError` with the ``apt-get install`` command that adds them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from warden._errors import HostError, ImageBuildError

TOOL_PACKAGES: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "chroot": "coreutils",
    "cp": "coreutils",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "mksquashfs": "squashfs-tools",
    "mmdebstrap": "mmdebstrap",
    "zstd": "zstd",
}
"""Each host tool the build may run, and the Debian package that ships it."""

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
TAIL_LINES = 40


def install_hint(packages: Sequence[str]) -> str:
    """The command that installs ``packages`` on a Debian host."""
    return "apt-get install -y --no-install-recommends " + " ".join(sorted(set(packages)))


def which(tool: str) -> str | None:
    """Find ``tool`` on PATH, then in the sbin dirs (often missing from a user's PATH)."""
    found = shutil.which(tool)
    if found:
        return found
    for d in _SBIN_DIRS:
        candidate = Path(d) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tools(*tools: str) -> dict[str, str]:
    """Return the absolute path of each tool, or raise HostError naming what to install."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool in tools:
        path = which(tool)
        if path is None:
            missing.append(tool)
        else:
            found[tool] = path
    if missing:
        packages = [TOOL_PACKAGES.get(t, t) for t in missing]
        raise HostError(
            f"the image build needs {', '.join(missing)}, which this host lacks; "
            f"install with: {install_hint(packages)}"
        )
    return found


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, indented for an error message."""
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept) if kept else "    (no output)"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for build commands: the caller's, minus what changes their output.

    ``SOURCE_DATE_EPOCH`` is dropped on purpose: with it set, Python writes hash-checked
    ``.pyc`` files, which makes every import in the guest hash its source first.
    """
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["LC_ALL"] = "C.UTF-8"
    path = env.get("PATH", "/usr/bin:/bin")
    for d in _SBIN_DIRS:
        if d not in path.split(":"):
            path += ":" + d
    env["PATH"] = path
    if extra:
        env.update(extra)
    return env


def run(
    step: str,
    argv: Sequence[str],
    *,
    hint: str = "",
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``argv`` and return its combined stdout+stderr as text.

    Raises ImageBuildError(step, argv, output tail, hint) when it fails or times out, and
    HostError when the program does not exist.
    """
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=clean_env(env),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        package = TOOL_PACKAGES.get(Path(args[0]).name, Path(args[0]).name)
        raise HostError(
            f"{args[0]} is not installed; install with: {install_hint([package])}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise ImageBuildError(
            step, args, tail(out), hint or f"the command ran longer than {timeout:.0f} s"
        ) from exc
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise ImageBuildError(step, args, tail(out) + f"\n    (exit code {proc.returncode})", hint)
    return out
