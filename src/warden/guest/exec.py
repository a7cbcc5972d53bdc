"""``exec``: one process in its own session, as the request's user, its output streamed back
within the stream credits, then its exit status."""

from __future__ import annotations

import contextlib
import os
import threading
import time

from warden.guest import pump, spawn, users
from warden.guest.args import Invalid, arg_bool, arg_str, failure
from warden.guest.log import log_exception
from warden.guest.request import Request
from warden.guest.stdin import MAX_QUEUED, StdinQueue, feed
from warden.wire.frame import Channel
from warden.wire.ops import ErrorKind, Key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from subprocess import Popen
    from typing import Any

    from warden.guest.session import Session
    from warden.guest.users import Account
    from warden.wire.frame import Frame

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
"""A command's default environment, with its account's HOME, USER and LOGNAME."""

_SIGKILL = 9
MAX_WAIT = 3600.0
"""The longest single wait for a process (threading refuses huge timeouts)."""


def parse_argv(args: dict[str, Any]) -> list[str]:
    argv = args.get(Key.ARGV)
    shell = args.get(Key.SHELL)
    if shell is not None:
        if argv is not None:
            raise Invalid("give 'argv' or 'shell', not both")
        if not isinstance(shell, str):
            raise Invalid("'shell' must be a string")
        return ["/bin/sh", "-c", shell]
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise Invalid("exec needs a non-empty 'argv' list of strings or a 'shell' string")
    return argv


def parse_env(args: dict[str, Any], account: Account) -> dict[str, str]:
    env = {**BASE_ENV, **account.env()}
    extra = args.get(Key.ENV) or {}
    if not isinstance(extra, dict):
        raise Invalid("'env' must be an object")
    for key, value in extra.items():
        if not key or "=" in key:
            raise Invalid(f"bad environment variable name {key!r}")
        if value is None:
            env.pop(key, None)
        elif isinstance(value, str):
            env[key] = value
        else:
            raise Invalid(f"environment variable {key!r} must be a string or null")
    return env


def parse_timeout(args: dict[str, Any]) -> float | None:
    timeout = args.get(Key.TIMEOUT)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
    ):
        raise Invalid("'timeout' must be a non-negative number or null")
    return timeout


class Exec(Request):
    def __init__(
        self, session: Session, request_id: int, args: dict[str, Any], account: Account
    ) -> None:
        super().__init__(session, request_id)
        self.argv = parse_argv(args)
        self.account = account
        self.env = parse_env(args, account)
        cwd = args.get(Key.CWD)
        self.cwd = account.home if cwd is None else arg_str(args, Key.CWD)
        self.timeout = parse_timeout(args)
        self.stdin: StdinQueue | None = StdinQueue() if arg_bool(args, Key.STDIN, False) else None
        self._lock = threading.Lock()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.new_credit(Channel.STDOUT, self._wake)
        self.new_credit(Channel.STDERR, self._wake)
        self.pid: int | None = None
        self.popen: Popen[bytes] | None = None
        self.cancelled = False
        self.killed_at: float | None = None
        self.timed_out = False
        self.done = False
        self.status: int | None = None
        self.exited = threading.Event()
        self.eofs: list[int] = []
        """Streams that ended: their EOFs go out with the response, in one send."""

    # -- called by the main thread

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"exec-{self.request_id}", daemon=True).start()

    def on_data(self, frame: Frame) -> None:
        if frame.channel != Channel.STDIN or self.stdin is None:
            return
        if not self.stdin.put(frame.payload):
            self.kill()
            self.stdin.put(None)

    def on_eof(self, frame: Frame) -> None:
        if frame.channel == Channel.STDIN and self.stdin is not None:
            self.stdin.put(None)

    def cancel(self) -> None:
        self.cancelled = True
        self.kill()
        self.close_credits()
        if self.stdin is not None:
            self.stdin.put(None)

    def _wake(self) -> None:
        with self._lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    # -- any thread

    def kill(self) -> None:
        with self._lock:
            if self.killed_at is None:
                self.killed_at = time.monotonic()
            if self.pid is not None and not self.done:
                with contextlib.suppress(OSError):
                    os.killpg(self.pid, _SIGKILL)

    def _on_exit(self, status: int) -> None:  # reaper thread
        self.status = status
        if self.popen is not None:
            # Popen never waits; a returncode keeps its __del__ from polling a reused pid.
            self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.exited.set()

    # -- the exec thread

    def _run(self) -> None:
        try:
            self._execute()
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            log_exception("exec")
            self.done = True
            self.finish(failure(ErrorKind.AGENT, "internal error in exec"), tuple(self.eofs))
        finally:
            if self.stdin is not None:
                self.stdin.put(None)
            with self._lock:
                fd, self.wake_fd = self.wake_fd, -1
            os.close(fd)

    def _spawn(self, fds: tuple[int, int, int]) -> spawn.Refusal | None:
        """Start the process; on failure the (exit code, message) a shell would give."""
        with users.spawning_as(self.account):  # the checks and the child: as the account
            refused = spawn.check_cwd(self.cwd)
            if refused is not None:
                return refused
            executable, refused = spawn.resolve(self.argv[0], self.cwd, self.env.get("PATH", ""))
            if executable is None:
                return refused
            reaper = self.session.agent.reaper
            process = spawn.popen(
                self.argv, executable, fds, self.cwd, self.env, self.account, reaper, self._on_exit
            )
        if isinstance(process, tuple):
            return process
        self.popen = process
        with self._lock:
            self.pid = process.pid
            if self.cancelled:
                self.killed_at = time.monotonic()
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, _SIGKILL)
        return None

    def _start_process(self) -> tuple[tuple[int, int, int] | None, spawn.Refusal | None]:
        """Make the pipes and start the process: its (stdout, stderr, stdin) ends, or why not."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.stdin is not None else (-1, -1)
        null = -1
        try:
            if in_r < 0:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            refused = self._spawn((in_r if in_r >= 0 else null, out_w, err_w))
        finally:
            for fd in (out_w, err_w, in_r, null):
                if fd >= 0:
                    os.close(fd)
        if refused is not None:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            return None, refused
        return (out_r, err_r, in_w), None

    def _stopped(self) -> bool:
        return self.done or self.killed_at is not None

    def _execute(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        fds, refused = self._start_process()
        if fds is None:
            self._refused(refused or (126, "warden: cannot start the command"))
            return
        out_r, err_r, in_w = fds
        if in_w >= 0 and self.stdin is not None:
            threading.Thread(
                target=feed,
                args=(self.stdin, in_w, self._stopped),
                name=f"stdin-{self.request_id}",
                daemon=True,
            ).start()
        pump.enlarge(out_r)
        pump.enlarge(err_r)
        pump.pump(self, {out_r: Channel.STDOUT, err_r: Channel.STDERR}, deadline)
        self._wait(deadline)
        self.done = True
        self.finish(self._result(), tuple(self.eofs))

    def _wait(self, deadline: float | None) -> None:
        while not self.exited.is_set():
            if deadline is None or self.killed_at is not None:
                self.exited.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                self.kill()
            else:  # in slices: a huge timeout would overflow the wait
                self.exited.wait(min(remaining, MAX_WAIT))

    def _result(self) -> dict[str, Any]:
        if self.stdin is not None and self.stdin.overflowed:
            return failure(
                ErrorKind.INVALID,
                f"exec: the command left more than {MAX_QUEUED >> 20} MiB of its stdin unread, "
                "so it was stopped; send stdin no faster than the command reads it",
            )
        exit_code, signal = spawn.exit_fields(self.status)
        return {
            Key.OK: True,
            Key.EXIT_CODE: exit_code,
            Key.SIGNAL: signal,
            Key.TIMED_OUT: self.timed_out,
        }

    def _refused(self, refusal: spawn.Refusal) -> None:
        code, message = refusal
        self.done = True
        session, rid = self.session, self.request_id
        session.send_eof(rid, Channel.STDOUT)
        data = message.encode("utf-8", "replace")[:4000] + b"\n"
        credit = self.credits[Channel.STDERR]
        if credit.available >= len(data):
            self.send(Channel.STDERR, credit, data)
        session.send_eof(rid, Channel.STDERR)
        self.finish({Key.OK: True, Key.EXIT_CODE: code, Key.SIGNAL: None, Key.TIMED_OUT: False})
