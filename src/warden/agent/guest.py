"""The warden guest agent.

It runs as PID 1 inside the microVM (``python3 -E -s -S /usr/lib/warden/agent_main.py``) and
serves exec, file and info requests from the host over the virtio-serial port named
``org.warden.agent.0``, speaking the framing of :mod:`warden.wire.frame`.

Constraints that shape this file:

* Standard library only, and nothing from warden but ``warden.wire.frame``.
* Python in the guest runs under TCG, about 7x slower than on the host: no asyncio, few imports
  at start (``subprocess``, ``ctypes``, ``shutil`` load lazily), threads and os-level I/O.
* As PID 1 it inherits every orphan, so one reaper thread collects every exit status and hands
  it to the exec that waits for that pid. ``subprocess.Popen`` only spawns; its ``wait``/``poll``
  are never called.

Threads: the main thread reads and decodes the port and handles quick requests inline; each
``exec`` gets a thread that pumps stdout/stderr (plus a stdin thread if it takes stdin); each
file ``read`` gets a thread; file ``write`` data is written by the main thread. Whole frames
are written to the port under one lock.

For tests, ``python -m warden.agent.guest --fd N`` serves one connection on an open fd (a
socketpair end) and exits at its EOF; ``--listen PATH`` serves connections on a unix socket
one after another, which exercises the same reset-on-disconnect path as the virtio port.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time
from queue import SimpleQueue

from warden.wire.frame import (
    PROTOCOL_VERSION,
    XFER_MAX_LENGTH,
    XFER_SERIAL,
    Channel,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_json,
    decode_xfer_ref,
    encode_header,
    encode_json,
)

# Not ``typing.TYPE_CHECKING``: importing typing is slow in the guest. Type checkers treat this
# name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from subprocess import Popen
    from typing import Any

AGENT_VERSION = "0.1.0"
AGENT_NAME = f"warden-agent/{AGENT_VERSION}"
PORT_NAME = "org.warden.agent.0"
VIRTIO_PORTS = "/sys/class/virtio-ports"

READ_SIZE = 256 * 1024
"""How much the main thread asks for per read of the connection."""
CHUNK = 64 * 1024
"""The largest DATA payload the agent sends (stdout/stderr and file reads)."""
KILL_GRACE = 2.0
"""After a kill, how long to keep draining pipes that escaped processes may still hold."""
IDLE_POLL = 0.01
"""Sleep between reads while the host side of the port is disconnected."""
PORT_WAIT = 10.0
"""How long to wait for the virtio port to appear at boot."""

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
DEFAULT_CWD = "/root"

RB_POWER_OFF = 0x4321FEDC
"""reboot(2) command. QEMU runs with -no-reboot, so a reboot ends it (poweroff may be unwired)."""

_SIGKILL = 9


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"warden-agent: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _log_exception(where: str) -> None:
    import traceback

    _log(f"unexpected error in {where}:\n{traceback.format_exc()}")


class _Invalid(ValueError):
    """A request with bad arguments; answered with error "invalid"."""


class _Shutdown(BaseException):
    """The host asked the agent to shut down (a control-flow signal, not an error)."""


# --------------------------------------------------------------------------------------------
# Reaping


class _Reaper:
    """Collects every child's exit status (the agent may be PID 1) and dispatches it by pid.

    Spawn while holding :attr:`lock` and :meth:`register` the pid before releasing it, so a
    child that exits at once is never mistaken for an unknown one.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._wake = threading.Event()
        self._wake.set()  # collect anything inherited at boot
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def register(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(wait_status)`` when ``pid`` exits. Caller holds :attr:`lock`."""
        self._waiters[pid] = callback
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break  # no children left; sleep until the next spawn
                except OSError:
                    _log_exception("reaper")
                    time.sleep(0.1)
                    break
                with self.lock:
                    callback = self._waiters.pop(pid, None)
                if callback is not None:
                    try:
                        callback(status)
                    except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                        _log_exception("reaper callback")


# --------------------------------------------------------------------------------------------
# Writing frames


class _Writer:
    """Writes whole frames to the connection; one per session, sharing the fd's lock.

    Once dead (the session ended), every send is dropped. With ``poll_first`` (the virtio port)
    it waits for POLLOUT before each write: the port reports POLLHUP instead while the host is
    disconnected, and a plain write would block until the next host connects and then send it
    stale bytes.
    """

    def __init__(self, fd: int, lock: threading.Lock, *, poll_first: bool) -> None:
        self.fd = fd
        self.lock = lock
        self.dead = False
        self._poller: select.poll | None = None
        if poll_first:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLOUT)

    def send(self, data: bytes) -> bool:
        with self.lock:
            if self.dead:
                return False
            view = memoryview(data)
            try:
                while view:
                    if self._poller is not None:
                        events = self._poller.poll()
                        if events and not events[0][1] & select.POLLOUT:
                            self.dead = True  # POLLHUP/POLLERR: the host went away
                            return False
                    if self.dead:
                        return False
                    written = os.write(self.fd, view)
                    view = view[written:]
            except OSError:
                self.dead = True
                return False
        return True


# --------------------------------------------------------------------------------------------
# Argument helpers


def _arg_str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise _Invalid(f"{key!r} must be a string")
    return value


def _arg_path(args: dict[str, Any]) -> str:
    path = _arg_str(args, "path")
    if not path.startswith("/"):
        raise _Invalid(f"path must be absolute: {path!r}")
    if "\0" in path:
        raise _Invalid("path contains a NUL byte")
    return path


def _arg_bool(args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise _Invalid(f"{key!r} must be a boolean")
    return value


def _arg_mode(args: dict[str, Any], default: int) -> int:
    value = args.get("mode", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise _Invalid("'mode' must be an integer between 0 and 0o7777")
    return value


def _file_error(op: str, path: str, exc: OSError) -> dict[str, Any]:
    where = exc.filename if isinstance(exc.filename, str) else path
    strerror = exc.strerror or str(exc)
    return {
        "ok": False,
        "error": "file",
        "errno": exc.errno,
        "path": where,
        "strerror": strerror,
        "message": f"{op} {where}: {strerror}",
    }


# --------------------------------------------------------------------------------------------
# Quick requests, answered inline by the main thread


def _read_meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _op_info(_args: dict[str, Any]) -> dict[str, Any]:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            uptime: float | None = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = None
    mem = _read_meminfo()
    return {
        "kernel": os.uname().release,
        "uptime_s": uptime,
        "mem_total_kib": mem.get("MemTotal"),
        "mem_available_kib": mem.get("MemAvailable"),
        "agent_version": AGENT_VERSION,
        "pid": os.getpid(),
    }


def _entry(path: str, name: str, st: os.stat_result) -> dict[str, Any]:
    import stat

    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": name,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
    }


def _op_stat(args: dict[str, Any]) -> dict[str, Any]:
    path = _arg_path(args)
    st = os.lstat(path)
    name = os.path.basename(path.rstrip("/")) or "/"
    return {"entry": _entry(path, name, st)}


def _op_list(args: dict[str, Any]) -> dict[str, Any]:
    path = _arg_path(args)
    entries = []
    with os.scandir(path) as it:
        for item in it:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
            entries.append(_entry(os.path.join(path, item.name), item.name, st))
    entries.sort(key=lambda e: str(e["name"]))
    return {"entries": entries}


def _op_remove(args: dict[str, Any]) -> dict[str, Any]:
    import stat

    path = _arg_path(args)
    recursive = _arg_bool(args, "recursive", False)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if recursive:
            import shutil

            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    return {}


def _op_mkdir(args: dict[str, Any]) -> dict[str, Any]:
    path = _arg_path(args)
    parents = _arg_bool(args, "parents", False)
    mode = _arg_mode(args, 0o755)
    if parents:
        os.makedirs(path, mode=mode, exist_ok=True)
        if not os.path.isdir(path):
            raise FileExistsError(17, "File exists", path)
    else:
        os.mkdir(path, mode)
    return {}


_QUICK_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": lambda _args: {},
    "info": _op_info,
    "stat": _op_stat,
    "list": _op_list,
    "remove": _op_remove,
    "mkdir": _op_mkdir,
}


# --------------------------------------------------------------------------------------------
# Streaming requests


class _Op:
    """A request that outlives its REQUEST frame: it receives DATA/EOF/CANCEL frames."""

    def __init__(self, session: Session, request_id: int) -> None:
        self.session = session
        self.request_id = request_id

    def on_data(self, frame: Frame) -> None:
        """Input on this request (ignored unless the op takes it)."""

    def on_eof(self, frame: Frame) -> None:
        """The end of an input stream of this request."""

    def cancel(self) -> None:
        """The host cancelled the request, or the session ended."""

    def finish(self, response: dict[str, Any]) -> None:
        self.session.forget(self.request_id)
        self.session.respond(self.request_id, response)


class _WriteFile(_Op):
    """``write``: DATA on channel FILE into a temp file in the target dir, renamed at EOF."""

    def __init__(self, session: Session, request_id: int, args: dict[str, Any]) -> None:
        super().__init__(session, request_id)
        self.path = _arg_path(args)
        self.mode = _arg_mode(args, 0o644)
        self.parents = _arg_bool(args, "parents", False)
        self.size = 0
        self.fd = -1
        self.tmp = ""

    def start(self) -> bool:
        """Open the temp file; answer at once and return False if that fails."""
        directory, name = os.path.split(self.path)
        try:
            if not name:
                raise IsADirectoryError(21, "Is a directory", self.path)
            if self.parents:
                os.makedirs(directory, exist_ok=True)
            self.tmp = os.path.join(directory, f".{name}.warden-{os.urandom(6).hex()}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.tmp, flags, 0o600)
        except OSError as exc:
            self.session.respond(self.request_id, _file_error("write", self.path, exc))
            return False
        return True

    def on_data(self, frame: Frame) -> None:
        if frame.channel == Channel.XFER:
            self._on_xfer(frame)
            return
        if frame.channel != Channel.FILE or self.fd < 0:
            return
        self._write(memoryview(frame.payload))

    def _on_xfer(self, frame: Frame) -> None:
        """Copy a piece of the transfer window into the file. Always acknowledged."""
        try:
            xfer = self.session.agent.xfer
            if self.fd < 0:
                return
            if xfer is None:
                self._discard()
                self.finish({"ok": False, "error": "invalid", "message": "no transfer window here"})
                return
            try:
                view = xfer.read(*decode_xfer_ref(frame.payload))
            except (OSError, FrameError) as exc:
                self._discard()
                self.finish({"ok": False, "error": "io", "message": f"transfer window: {exc}"})
                return
            self._write(view)
        finally:
            self.session.send_data(self.request_id, Channel.XFER, frame.payload)

    def _write(self, view: memoryview) -> None:
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self._discard()
            self.finish(_file_error("write", self.path, exc))

    def on_eof(self, frame: Frame) -> None:
        if frame.channel != Channel.FILE or self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            try:
                os.fchmod(fd, self.mode)
            finally:
                os.close(fd)
            os.rename(self.tmp, self.path)
        except OSError as exc:
            self._unlink_tmp()
            self.finish(_file_error("write", self.path, exc))
            return
        self.finish({"ok": True, "size": self.size})

    def cancel(self) -> None:
        if self.fd >= 0:
            self._discard()
            self.finish({"ok": False, "error": "cancelled", "message": "write cancelled"})

    def _discard(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class _ReadFile(_Op):
    """``read``: the file as DATA frames on channel FILE, then EOF, then the size."""

    def __init__(self, session: Session, request_id: int, args: dict[str, Any]) -> None:
        super().__init__(session, request_id)
        self.path = _arg_path(args)
        self.cancelled = False

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"read-{self.request_id}", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled = True

    def _run(self) -> None:
        try:
            self.finish(self._stream())
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            _log_exception("read")
            self.finish({"ok": False, "error": "agent", "message": "internal error in read"})

    def _stream(self) -> dict[str, Any]:
        session, rid = self.session, self.request_id
        size = 0
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return _file_error("read", self.path, exc)
        try:
            while True:
                if self.cancelled:
                    return {"ok": False, "error": "cancelled", "message": "read cancelled"}
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if not session.send_data(rid, Channel.FILE, chunk):
                    return {"ok": False, "error": "cancelled", "message": "connection closed"}
        except OSError as exc:
            return _file_error("read", self.path, exc)
        finally:
            os.close(fd)
        session.send_eof(rid, Channel.FILE)
        return {"ok": True, "size": size}


def _reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _resolve(argv0: str, cwd: str, search_path: str) -> tuple[str | None, tuple[int, str] | None]:
    """Find the executable like a shell: (its path, None), or (None, (exit code, message))."""
    import stat

    if "/" in argv0:
        candidates = [os.path.join(cwd, argv0)]
    else:
        candidates = [os.path.join(cwd, d or ".", argv0) for d in search_path.split(":")]
    refused: tuple[int, str] | None = None
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
            if "/" in argv0:
                return None, (127, f"warden: {argv0}: {_reason(exc)}")
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


def _exit_fields(status: int | None) -> tuple[int | None, int | None]:
    if status is None:
        return None, None
    code = os.waitstatus_to_exitcode(status)
    return (code, None) if code >= 0 else (None, -code)


class _Exec(_Op):
    """``exec``: one process in its own session, its output streamed back, then its status."""

    def __init__(self, session: Session, request_id: int, args: dict[str, Any]) -> None:
        super().__init__(session, request_id)
        argv = args.get("argv")
        shell = args.get("shell")
        if shell is not None:
            if argv is not None:
                raise _Invalid("give 'argv' or 'shell', not both")
            if not isinstance(shell, str):
                raise _Invalid("'shell' must be a string")
            argv = ["/bin/sh", "-c", shell]
        elif not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise _Invalid("exec needs a non-empty 'argv' list of strings or a 'shell' string")
        self.argv: list[str] = argv
        env = dict(DEFAULT_ENV)
        extra = args.get("env") or {}
        if not isinstance(extra, dict):
            raise _Invalid("'env' must be an object")
        for key, value in extra.items():
            if not key or "=" in key:
                raise _Invalid(f"bad environment variable name {key!r}")
            if value is None:
                env.pop(key, None)
            elif isinstance(value, str):
                env[key] = value
            else:
                raise _Invalid(f"environment variable {key!r} must be a string or null")
        self.env = env
        cwd = args.get("cwd")
        self.cwd = DEFAULT_CWD if cwd is None else _arg_str(args, "cwd")
        self.wants_stdin = _arg_bool(args, "stdin", False)
        timeout = args.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise _Invalid("'timeout' must be a non-negative number or null")
        self.timeout: float | None = timeout
        self.stdin_queue: SimpleQueue[bytes | None] | None = (
            SimpleQueue() if self.wants_stdin else None
        )
        self._kill_lock = threading.Lock()
        self.pid: int | None = None
        self.popen: Popen[bytes] | None = None
        self.cancelled = False
        self.killed_at: float | None = None
        self.timed_out = False
        self.done = False
        self.status: int | None = None
        self.exited = threading.Event()

    # -- called by the main thread

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"exec-{self.request_id}", daemon=True).start()

    def on_data(self, frame: Frame) -> None:
        if frame.channel == Channel.STDIN and self.stdin_queue is not None:
            self.stdin_queue.put(frame.payload)

    def on_eof(self, frame: Frame) -> None:
        if frame.channel == Channel.STDIN and self.stdin_queue is not None:
            self.stdin_queue.put(None)

    def cancel(self) -> None:
        self.cancelled = True
        self._kill()
        if self.stdin_queue is not None:
            self.stdin_queue.put(None)

    # -- the exec thread

    def _kill(self) -> None:
        with self._kill_lock:
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

    def _run(self) -> None:
        try:
            self._execute()
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            _log_exception("exec")
            self.done = True
            self.finish({"ok": False, "error": "agent", "message": "internal error in exec"})
        finally:
            if self.stdin_queue is not None:
                self.stdin_queue.put(None)

    def _spawn(self, stdin: int, stdout: int, stderr: int) -> tuple[int, str] | None:
        """Start the process; on failure the (exit code, message) a shell would give."""
        import stat
        import subprocess

        try:
            if not stat.S_ISDIR(os.stat(self.cwd).st_mode):
                raise NotADirectoryError(20, "Not a directory", self.cwd)
        except (OSError, ValueError) as exc:
            return 127, f"warden: cd: {self.cwd}: {_reason(exc)}"
        argv0 = self.argv[0]
        executable, refused = _resolve(argv0, self.cwd, self.env.get("PATH", ""))
        if refused is not None:
            return refused
        reaper = self.session.agent.reaper
        try:
            with reaper.lock:
                popen = subprocess.Popen(
                    self.argv,
                    executable=executable,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                    close_fds=True,
                )
                self.popen = popen
                reaper.register(popen.pid, self._on_exit)
        except OSError as exc:
            if exc.filename == self.cwd and exc.filename != argv0:
                return 127, f"warden: cd: {self.cwd}: {exc.strerror}"
            if isinstance(exc, FileNotFoundError):
                if "/" not in argv0:
                    return 127, f"warden: {argv0}: command not found"
                return 127, f"warden: {argv0}: No such file or directory"
            return 126, f"warden: {argv0}: {exc.strerror or exc}"
        except ValueError as exc:  # e.g. an embedded NUL byte
            return 126, f"warden: {argv0}: {exc}"
        with self._kill_lock:
            self.pid = popen.pid
            if self.cancelled:
                self.killed_at = time.monotonic()
                with contextlib.suppress(OSError):
                    os.killpg(popen.pid, _SIGKILL)
        return None

    def _execute(self) -> None:
        session, rid = self.session, self.request_id
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.wants_stdin else (-1, -1)
        null = -1
        try:
            if in_r < 0:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            failure = self._spawn(in_r if in_r >= 0 else null, out_w, err_w)
        finally:
            for fd in (out_w, err_w, in_r, null):
                if fd >= 0:
                    os.close(fd)
        if failure is not None:
            code, message = failure
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            self.done = True
            session.send_eof(rid, Channel.STDOUT)
            session.send_data(rid, Channel.STDERR, message.encode("utf-8", "replace") + b"\n")
            session.send_eof(rid, Channel.STDERR)
            self.finish({"ok": True, "exit_code": code, "signal": None, "timed_out": False})
            return
        if in_w >= 0:
            threading.Thread(
                target=self._feed_stdin, args=(in_w,), name=f"stdin-{rid}", daemon=True
            ).start()
        self._pump(out_r, err_r, deadline)
        while not self.exited.is_set():
            wait = None if deadline is None or self.killed_at is not None else deadline
            if wait is None:
                self.exited.wait()
            elif not self.exited.wait(max(0.0, wait - time.monotonic())):
                self.timed_out = True
                self._kill()
        self.done = True
        exit_code, signal = _exit_fields(self.status)
        self.finish(
            {"ok": True, "exit_code": exit_code, "signal": signal, "timed_out": self.timed_out}
        )

    def _pump(self, out_r: int, err_r: int, deadline: float | None) -> None:
        """Stream stdout and stderr until both close (or a kill's grace period passes)."""
        session, rid = self.session, self.request_id
        channels = {out_r: Channel.STDOUT, err_r: Channel.STDERR}
        poller = select.poll()
        for fd in channels:
            poller.register(fd, select.POLLIN)
        try:
            while channels:
                now = time.monotonic()
                if self.killed_at is not None:
                    limit: float | None = self.killed_at + KILL_GRACE
                else:
                    limit = deadline
                if limit is not None and now >= limit:
                    if self.killed_at is None:
                        self.timed_out = True
                        self._kill()
                        continue
                    break  # killed, but something that escaped still holds a pipe
                # Wake at least once a second to notice a cancel that left the pipes open.
                wait_ms = 1000 if limit is None else min(1000, int((limit - now) * 1000) + 1)
                for fd, _events in poller.poll(wait_ms):
                    try:
                        data = os.read(fd, CHUNK)
                    except OSError:
                        data = b""
                    if data:
                        session.send_data(rid, channels[fd], data)
                    else:
                        poller.unregister(fd)
                        os.close(fd)
                        session.send_eof(rid, channels.pop(fd))
        finally:
            for fd, channel in channels.items():
                os.close(fd)
                session.send_eof(rid, channel)

    def _feed_stdin(self, fd: int) -> None:
        queue = self.stdin_queue
        assert queue is not None
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        broken = False
        try:
            while True:
                item = queue.get()
                if item is None:
                    break
                view = memoryview(item)
                while view and not broken:
                    if self.done or self.killed_at is not None:
                        broken = True
                        break
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:
                        poller.poll(1000)
                    except OSError:  # EPIPE: the process closed stdin
                        broken = True
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            _log_exception("stdin")
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Sessions


class Session:
    """One host's session: from its HELLO to EOF, a protocol error, or the next HELLO.

    Made by :class:`_Connection` when a HELLO arrives. Its writer dies with it, so frames of
    its requests that finish later never reach the next host's session.
    """

    def __init__(self, agent: Agent, writer: _Writer) -> None:
        self.agent = agent
        self.writer = writer
        self.broken = False
        self.requests: dict[int, _Op] = {}
        self._lock = threading.Lock()

    # -- sending (any thread)

    def send_data(self, request_id: int, channel: Channel, data: bytes) -> bool:
        header = encode_header(FrameType.DATA, request_id, channel, len(data))
        return self.writer.send(header + data)

    def send_eof(self, request_id: int, channel: Channel) -> bool:
        return self.writer.send(encode_header(FrameType.EOF, request_id, channel, 0))

    def respond(self, request_id: int, response: dict[str, Any]) -> None:
        try:
            data = encode_json(FrameType.RESPONSE, request_id, response)
        except FrameError as exc:
            data = encode_json(
                FrameType.RESPONSE,
                request_id,
                {"ok": False, "error": "agent", "message": f"cannot send the response: {exc}"},
            )
        self.writer.send(data)

    def forget(self, request_id: int) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    # -- receiving (main thread)

    def protocol_error(self, message: str, nonce: object = None) -> None:
        """Tell the host (ERROR on request 0) and end the session."""
        _log(f"protocol error: {message}")
        report: dict[str, Any] = {"error": "protocol", "message": message}
        if nonce is not None:
            report["nonce"] = nonce
        self.writer.send(encode_json(FrameType.ERROR, 0, report))
        self.close()

    def close(self) -> None:
        """End the session: stop sending, kill its processes, drop its requests."""
        self.broken = True
        self.writer.dead = True
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._lock:
            ops = list(self.requests.values())
        for op in ops:
            try:
                op.cancel()
            except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                _log_exception("cancel")

    def hello(self, frame: Frame) -> None:
        """Answer the HELLO that began this session, echoing its nonce."""
        try:
            hello = decode_json(frame)
        except FrameError as exc:
            self.protocol_error(str(exc))
            return
        nonce = hello.get("nonce")
        versions = hello.get("versions")
        if not isinstance(versions, list) or PROTOCOL_VERSION not in versions:
            self.protocol_error(
                f"no common protocol version: the host offers {versions!r}, "
                f"the agent speaks {PROTOCOL_VERSION}",
                nonce,
            )
            return
        if os.getpid() == 1:  # only ever in a guest: never touch a host's clock or pool
            _freshen(hello.get("seed"), hello.get("time"))
        reply: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "agent": AGENT_NAME,
            "pid": os.getpid(),
            "xfer": self.agent.xfer is not None,
        }
        if nonce is not None:
            reply["nonce"] = nonce
        try:
            self.writer.send(encode_json(FrameType.HELLO, 0, reply))
        except FrameError as exc:  # a nonce too big to echo
            self.protocol_error(f"cannot answer the HELLO: {exc}")

    def handle(self, frame: Frame) -> None:
        """Act on one frame of this session (any but HELLO). Raises :class:`_Shutdown`."""
        try:
            self._handle(frame)
        except FrameError as exc:
            self.protocol_error(str(exc))
        except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
            _log_exception(f"handling {frame.type.name}")
            if frame.type == FrameType.REQUEST:
                self.forget(frame.request_id)
                message = "internal error in the agent (see the console)"
                self.respond(frame.request_id, {"ok": False, "error": "agent", "message": message})

    def _handle(self, frame: Frame) -> None:
        ftype, rid = frame.type, frame.request_id
        if ftype == FrameType.REQUEST:
            self._request(frame)
        elif ftype in (FrameType.DATA, FrameType.EOF, FrameType.CANCEL):
            with self._lock:
                op = self.requests.get(rid)
            if op is None:
                if ftype == FrameType.DATA and frame.channel == Channel.XFER:
                    # Every window reference is acknowledged, even for a finished request,
                    # or the host would lose that part of its window.
                    self.send_data(rid, Channel.XFER, frame.payload)
                return  # a request that already finished (or never started): not an error
            if ftype == FrameType.DATA:
                op.on_data(frame)
            elif ftype == FrameType.EOF:
                op.on_eof(frame)
            else:
                op.cancel()
        elif ftype == FrameType.ERROR:
            _log(f"the host reported a protocol error: {frame.payload[:500]!r}")
            self.close()
        else:
            self.protocol_error(f"unexpected {ftype.name} frame from the host")

    def _request(self, frame: Frame) -> None:
        rid = frame.request_id
        if rid == 0:
            self.protocol_error("REQUEST on request id 0")
            return
        with self._lock:
            in_use = rid in self.requests
        if in_use:
            self.protocol_error(f"request id {rid} is already in use")
            return
        args = decode_json(frame)
        op = args.get("op")
        try:
            if not isinstance(op, str):
                raise _Invalid("a request needs an 'op' string")
            if op in _QUICK_OPS:
                self.respond(rid, self._quick(op, args))
            elif op == "exec":
                self._start(_Exec(self, rid, args))
            elif op == "write":
                writer = _WriteFile(self, rid, args)
                if writer.start():
                    with self._lock:
                        self.requests[rid] = writer
            elif op == "read":
                self._start(_ReadFile(self, rid, args))
            elif op == "shutdown":
                reboot = _arg_bool(args, "reboot", False)
                self.respond(rid, {"ok": True})
                raise _Shutdown(reboot)
            else:
                self.respond(
                    rid, {"ok": False, "error": "invalid", "message": f"unknown op {op!r}"}
                )
        except _Invalid as exc:
            self.respond(rid, {"ok": False, "error": "invalid", "message": f"{op}: {exc}"})

    def _start(self, op: _Exec | _ReadFile) -> None:
        with self._lock:
            self.requests[op.request_id] = op
        op.start()

    def _quick(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            result = _QUICK_OPS[op](args)
        except _Invalid:
            raise
        except OSError as exc:
            return _file_error(op, str(args.get("path")), exc)
        except Exception as exc:  # noqa: BLE001 - reported to the host
            _log_exception(op)
            return {"ok": False, "error": "agent", "message": f"{op}: {type(exc).__name__}: {exc}"}
        result["ok"] = True
        return result


def _hung_up(poller: select.poll) -> bool:
    """Whether the host is disconnected from the virtio port right now (it reports POLLHUP)."""
    events = poller.poll(0)
    return bool(events) and bool(events[0][1] & (select.POLLHUP | select.POLLERR))


class _Connection:
    """The byte stream from one host connection (the virtio port between two EOFs, or a socket).

    Sessions on it begin at a HELLO. Its decoder hunts for one (see ``RESYNC_PADDING_SIZE`` in
    :mod:`warden.wire.frame`): bytes before it are a stale tail of an earlier host's stream and
    are dropped. A malformed frame ends the session, and the hunt starts again from there; a
    HELLO in the middle of a session ends it and begins the next (a new host behind an EOF the
    port never showed, such as a manager restarted after kill -9).
    """

    def __init__(self, agent: Agent, fd: int, lock: threading.Lock, *, poll_writes: bool) -> None:
        self.agent = agent
        self.fd = fd
        self.lock = lock
        self.poll_writes = poll_writes
        self.decoder = FrameDecoder(hunt=True)
        self.session: Session | None = None

    def _writer(self) -> _Writer:
        return _Writer(self.fd, self.lock, poll_first=self.poll_writes)

    def feed(self, data: bytes) -> None:
        """Handle bytes from the host. Raises :class:`_Shutdown` when asked to stop."""
        while True:
            error: FrameError | None = None
            try:
                frames = self.decoder.feed(data)
            except FrameError as exc:
                error, frames = exc, exc.frames  # act on the good frames before the bad one
            for frame in frames:
                self._handle(frame)
            if error is None:
                return
            session = self.session or Session(self.agent, self._writer())
            session.protocol_error(f"malformed frame: {error}")
            self.session = None
            self.decoder.resync()
            data = b""  # hunt through what is already buffered

    def _handle(self, frame: Frame) -> None:
        if frame.type == FrameType.HELLO:
            self.end_session()
            self.session = Session(self.agent, self._writer())
            self.session.hello(frame)
        elif self.session is not None:
            self.session.handle(frame)
        # else: the rest of a session that ended in a protocol error, until the next HELLO
        if self.session is not None and self.session.broken:
            self.session = None

    def end_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


# --------------------------------------------------------------------------------------------
# The agent


class _XferWindow:
    """The guest's side of the transfer window: O_DIRECT reads into one aligned buffer.

    Only the session's reader thread calls :meth:`read`, so one buffer serves every request.
    """

    def __init__(self, device: str) -> None:
        import mmap

        self.fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, XFER_MAX_LENGTH)

    def read(self, offset: int, length: int) -> memoryview:
        if offset + length > self.size:
            raise OSError(f"reference past the end of the window ({self.size} bytes)")
        span = -(-length // 512) * 512  # O_DIRECT reads whole sectors
        done = os.preadv(self.fd, [memoryview(self.buffer)[:span]], offset)
        if done < length:
            raise OSError(f"short read from the window: {done} of {length} bytes")
        return memoryview(self.buffer)[:length]


def _find_xfer() -> _XferWindow | None:
    """The transfer window disk, found by its serial; None where there is none."""
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/sys/block/{name}/serial", encoding="ascii", errors="replace") as f:
                serial = f.read().strip()
        except OSError:
            continue
        if serial == XFER_SERIAL:
            try:
                return _XferWindow(f"/dev/{name}")
            except OSError as exc:
                _log(f"cannot open the transfer window /dev/{name}: {exc}")
    return None


class Agent:
    def __init__(self) -> None:
        self.reaper = _Reaper()
        self.xfer: _XferWindow | None = _find_xfer() if os.getpid() == 1 else None
        # Load subprocess while the host is still connecting, not in the first exec.
        threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()

    def serve_fd(
        self,
        fd: int,
        *,
        reconnect: bool,
        poll_writes: bool = False,
    ) -> bool:
        """Serve the connection on ``fd``. Returns True if the host asked for a shutdown.

        Without ``reconnect``, EOF ends it. With it (the virtio port), EOF means the host side
        disconnected: the session is reset and the agent waits for the next host on the same fd.

        The port gives EOF only once its buffer is empty, though. A host that dies while the
        agent is busy with its requests leaves bytes there, and the next host (a manager
        restarted after kill -9) may connect before they are read. So with ``poll_writes`` the
        port is also asked after every read whether the host is gone: if so, the session ends
        and the rest of the old stream is skipped by the next connection's hunt for a HELLO.
        """
        lock = threading.Lock()
        connection: _Connection | None = None
        hangup: select.poll | None = None
        if poll_writes:
            hangup = select.poll()
            hangup.register(fd, 0)  # POLLHUP and POLLERR are reported regardless
        try:
            while True:
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError as exc:
                    if not reconnect:
                        _log(f"reading the connection failed: {exc}")
                    data = b""
                if connection is not None and hangup is not None and _hung_up(hangup):
                    connection.end_session()
                    connection = None
                if not data:
                    if connection is not None:
                        connection.end_session()
                        connection = None
                    if not reconnect:
                        return False
                    time.sleep(IDLE_POLL)
                    continue
                if connection is None:
                    connection = _Connection(self, fd, lock, poll_writes=poll_writes)
                connection.feed(data)
        except _Shutdown:
            return True
        finally:
            if connection is not None:
                connection.end_session()

    def serve_port(self) -> None:
        """Serve the virtio port until the host asks for a shutdown."""
        fd = _open_port()
        while True:
            try:
                if self.serve_fd(fd, reconnect=True, poll_writes=True):
                    return
            except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
                _log_exception("serve")
                time.sleep(0.1)

    def serve_listen(self, path: str) -> None:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            # Bound and listening under a temp name first: the path appears only once a
            # connection to it is accepted, never refused.
            pending = f"{path}.{os.getpid()}.tmp"
            server.bind(pending)
            try:
                server.listen(1)
                os.rename(pending, path)
            except BaseException:
                os.unlink(pending)
                raise
            try:
                while True:
                    conn, _ = server.accept()
                    with conn:
                        if self.serve_fd(conn.fileno(), reconnect=False):
                            return
            finally:
                os.unlink(path)


def _warm_up() -> None:
    import subprocess

    del subprocess


def _find_port() -> str | None:
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


def _open_port() -> int:
    deadline = time.monotonic() + PORT_WAIT
    while True:
        device = _find_port()
        if device is not None:
            try:
                return os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot open {device}: {exc}") from exc
        elif time.monotonic() > deadline:
            raise RuntimeError(f"no virtio port named {PORT_NAME} under {VIRTIO_PORTS}")
        time.sleep(0.05)


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def _freshen(seed: object, host_time: object) -> None:
    """Mix the host's seed into the kernel's entropy pool, reseed it, and set the clock.

    A VM restored from a boot snapshot starts with the RNG state and the clock of the moment
    the snapshot was taken, as does every other VM restored from it. The host sends a fresh
    seed and the time with every HELLO, and they are applied before any request runs.
    """
    if isinstance(host_time, int | float):
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(host_time))
        except OSError as exc:
            _log(f"clock_settime failed: {exc}")
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
            _log(f"reseeding the RNG failed: {exc}")


def _power_off() -> None:
    """Sync and end the VM. Only returns when the agent is not PID 1."""
    os.sync()
    if os.getpid() != 1:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(RB_POWER_OFF)
        _log(f"reboot(2) failed: errno {ctypes.get_errno()}")
    except Exception:  # noqa: BLE001 - the agent logs and carries on, never dies
        _log_exception("reboot")
    try:
        with open("/proc/sysrq-trigger", "w", encoding="ascii") as f:
            f.write("b")
    except OSError:
        pass
    os._exit(0)  # PID 1 exiting panics the kernel, and panic=-1 reboots: QEMU ends either way


_USAGE = "usage: python -m warden.agent.guest [--fd N | --listen PATH]"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--fd" and args[1].isdigit():
        fd = int(args[1])
        os.set_inheritable(fd, False)
        Agent().serve_fd(fd, reconnect=False)
    elif len(args) == 2 and args[0] == "--listen":
        Agent().serve_listen(args[1])
    elif not args:
        try:
            Agent().serve_port()
        except BaseException:
            _log_exception("main")
            if os.getpid() != 1:
                raise
        _power_off()
    else:
        sys.stderr.write(_USAGE + "\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
