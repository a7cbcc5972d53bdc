"""Entry point of the per-owner janitor process (see :mod:`warden.vmm.ownership`).

It starts with every VM its owner launches first, on the same cores, so it waits for its
owner's end before it imports what it sweeps with (~35 ms of imports, moved off the launch).
"""

from __future__ import annotations

import os
import signal
import sys


def _options(argv: list[str]) -> dict[str, str]:
    """``--fd N --owner PID --dir PATH``, as :func:`ownership._ensure_janitor` passes them."""
    pairs = dict(zip(argv[::2], argv[1::2], strict=False))
    if len(argv) % 2 or set(pairs) != {"--fd", "--owner", "--dir"}:
        raise SystemExit(f"usage: warden-janitor --fd N --owner PID --dir PATH (not {argv})")
    return pairs


def main(argv: list[str]) -> int:
    options = _options(argv)
    fd = int(options["--fd"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
    # The owner is gone: its QEMUs got SIGKILL from the kernel; remove what they left.
    from pathlib import Path

    from warden.vmm.ownership import sweep_stale

    sweep_stale(Path(options["--dir"]), owner_pid=int(options["--owner"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
