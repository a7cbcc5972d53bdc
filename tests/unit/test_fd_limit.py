"""The daemon raises its soft limit on open files to the hard one (``server/run.py``): it holds
~8 files per VM, and the usual soft limit of 1024 would end it at ~120 VMs with EMFILE. Run
in a child process started with a low soft limit, so this test's own limits stay as they are."""

from __future__ import annotations

import resource
import subprocess
import sys

CHECK = (
    "import resource; from warden.server.run import raise_fd_limit; "
    "got = raise_fd_limit(); print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
)


def _run(soft: int, hard: int) -> tuple[list[int], str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    done = subprocess.run(
        [sys.executable, "-c", CHECK], preexec_fn=limit, capture_output=True, text=True, check=True
    )
    return [int(x) for x in done.stdout.split()], done.stderr


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    assert _run(256, 4096)[0] == [4096, 4096]


def test_a_hard_limit_too_low_for_density_is_reported() -> None:
    (got, now), err = _run(512, 1500)
    assert got == now == 1500
    assert "room for about 61 VMs" in err and "LimitNOFILE" in err, err
