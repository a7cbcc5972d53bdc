"""Starting a command: finding its executable like a shell, and the shell's exit codes."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from subprocess import Popen

    from warden.guest.reaper import Reaper
    from warden.guest.users import Account

Refusal = tuple[int, str]
"""The exit code and the message a shell would give for a command it cannot start."""


def reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def resolve(argv0: str, cwd: str, search_path: str) -> tuple[str | None, Refusal | None]:
    """Find the executable like a shell: (its path, None), or (None, (exit code, message))."""
    import stat

    if "/" in argv0:
        candidates = [os.path.join(cwd, argv0)]
    else:
        candidates = [os.path.join(cwd, d or ".", argv0) for d in search_path.split(":")]
    refused: Refusal | None = None
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
            if "/" in argv0:
                return None, (127, f"warden: {argv0}: {reason(exc)}")
            continue
        if stat.S_ISDIR(st.st_mode):
            refused = refused or (126, f"warden: {argv0}: Is a directory")
        elif not os.access(candidate, os.X_OK):
            refused = refused or (126, f"warden: {argv0}: Permission denied")
        else:
            return candidate, None
        if "/" in argv0:
            break
    return None, refused or (127, f"warden: {argv0}: command not found")


def exit_fields(status: int | None) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait status."""
    if status is None:
        return None, None
    code = os.waitstatus_to_exitcode(status)
    return (code, None) if code >= 0 else (None, -code)


def check_cwd(cwd: str) -> Refusal | None:
    import stat

    try:
        if not stat.S_ISDIR(os.stat(cwd).st_mode):
            raise NotADirectoryError(20, "Not a directory", cwd)
    except (OSError, ValueError) as exc:
        return 127, f"warden: cd: {cwd}: {reason(exc)}"
    return None


def popen(
    argv: list[str],
    executable: str,
    fds: tuple[int, int, int],
    cwd: str,
    env: dict[str, str],
    account: Account,
    reaper: Reaper,
    on_exit: Callable[[int], None],
) -> Popen[bytes] | Refusal:
    """Start the process in its own session; a refusal if that fails.

    The calling thread must already have ``account``'s ids (:func:`users.spawning_as`): the child
    inherits them through vfork.
    """
    import subprocess

    argv0 = argv[0]
    try:
        with reaper.lock:
            process = subprocess.Popen(
                argv,
                executable=executable,
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
            reaper.register(process.pid, on_exit)
    except OSError as exc:
        if exc.filename == cwd and exc.filename != argv0:
            return 127, f"warden: cd: {cwd}: {exc.strerror}"
        if isinstance(exc, FileNotFoundError):
            if "/" not in argv0:
                return 127, f"warden: {argv0}: command not found"
            return 127, f"warden: {argv0}: No such file or directory"
        return 126, f"warden: {argv0}: {exc.strerror or exc}"
    except ValueError as exc:  # e.g. an embedded NUL byte
        return 126, f"warden: {argv0}: {exc}"
    return process
