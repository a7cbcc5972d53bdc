"""The real guest agent, run on the host as a subprocess, driven by the real AgentClient.

No VM is booted: the agent serves one end of a socketpair (``--fd``), or a unix socket
(``--listen``) for the reconnect tests. Every test checks that the agent exits with status 0
and printed no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from warden._errors import (
    AgentError,
    AgentTimeoutError,
    CommandTimeoutError,
    GuestFileError,
    ProtocolError,
    SandboxClosedError,
)
from warden.agent import client as client_module
from warden.agent.client import AgentClient, EntryInfo, ExecResult
from warden.wire.frame import (
    RESYNC_PADDING_SIZE,
    SESSION_VERSION,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    decode_json,
    encode,
    encode_json,
)
from warden.wire.ops import USER_GID, USER_UID

T = TypeVar("T")

AGENT = [sys.executable, "-m", "warden.guest"]


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def process_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` no longer runs (gone, or a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):  # gone, or going as we read
            return True
        time.sleep(0.02)
    return False


@dataclass
class LocalAgent:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    log: Path
    home: Path
    """The home of the guest's user here (the agent's ``--user-home``)."""
    expect_clean_exit: bool = True
    clients: list[AgentClient] = field(default_factory=list)

    async def connect(self) -> AgentClient:
        reader, writer = await asyncio.open_connection(sock=self.sock, limit=1 << 20)
        client = await AgentClient.from_streams(reader, writer, timeout=10)
        self.clients.append(client)
        return client


def _check_exit(proc: subprocess.Popen[bytes], log: Path, expect_clean: bool) -> None:
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the agent did not exit after its connection closed")
    output = log.read_text(errors="replace")
    if expect_clean:
        assert code == 0, f"agent exited with {code}:\n{output}"
    assert "Traceback" not in output, output


def owned_by_user(path: Path) -> Path:
    """Give ``path`` to the guest's ``user`` (uid 1000), as whom the agent runs by default."""
    if os.geteuid() == 0:  # else the agent cannot switch users either, and acts as itself
        os.chown(path, USER_UID, USER_GID)
    return path


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A scratch dir the guest's user may reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="warden-agent-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def agent(tmp_path: Path, user_tmp: Path) -> Iterator[LocalAgent]:
    parent, child = socket.socketpair()
    log = tmp_path / "agent.log"
    home = user_tmp / "home"
    home.mkdir(mode=0o700)
    owned_by_user(home)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*AGENT, "--fd", str(child.fileno()), "--user-home", str(home)],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    child.close()
    handle = LocalAgent(proc, parent, log, home)
    try:
        yield handle
    finally:
        parent.close()
        _check_exit(proc, log, handle.expect_clean_exit)


@pytest.fixture
def workdir(user_tmp: Path) -> Iterator[Path]:
    """A scratch dir for the agent to work in, owned by its default user; removed afterwards
    (the tests write MiBs)."""
    path = user_tmp / "work"
    path.mkdir()
    owned_by_user(path)
    yield path
    shutil.rmtree(path)


def with_client(
    agent: LocalAgent, body: Callable[[AgentClient], Awaitable[None]], timeout: float = 60.0
) -> None:
    async def main() -> None:
        client = await agent.connect()
        try:
            await body(client)
        finally:
            await client.close()

    run(main(), timeout)


async def pid_of(client: AgentClient, script: str, **kwargs: Any) -> tuple[asyncio.Task[Any], int]:
    """Start ``script`` (which must print a pid line first) and return its task and that pid."""
    first_line: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_stdout(data: bytes) -> None:
        if not first_line.done():
            first_line.set_result(int(data.split(b"\n")[0]))

    task = asyncio.create_task(client.exec(script, on_stdout=on_stdout, **kwargs))
    return task, await asyncio.wait_for(first_line, 10)


# --------------------------------------------------------------------------------------------
# hello, ping, info


def test_hello_ping_info(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        assert client.agent_hello["version"] == SESSION_VERSION
        assert client.agent_hello["pid"] == agent.proc.pid
        assert str(client.agent_hello["agent"]).startswith("warden-agent/")
        assert 0 < await client.ping() < 1
        info = await client.info()
        assert info["kernel"] == os.uname().release
        assert info["pid"] == agent.proc.pid
        assert isinstance(info["uptime_s"], float)
        assert isinstance(info["mem_total_kib"], int)
        assert isinstance(info["mem_available_kib"], int)
        assert info["mem_total_kib"] >= info["mem_available_kib"] > 0
        assert info["agent_version"]

    with_client(agent, body)


# --------------------------------------------------------------------------------------------
# exec


def test_exec_exit_codes_and_signals(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        assert await client.exec(["true"]) == ExecResult(0, None, b"", b"", False)
        assert (await client.exec(["false"])).exit_code == 1
        assert (await client.exec(["sh", "-c", "exit 42"])).exit_code == 42
        killed = await client.exec("kill -TERM $$; sleep 5")
        assert (killed.exit_code, killed.signal, killed.timed_out) == (None, signal.SIGTERM, False)

    with_client(agent, body)


def test_exec_output_and_shell(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        result = await client.exec("echo out; echo err >&2; printf 'a b' | tr ' ' _")
        assert result.stdout == b"out\na_b"
        assert result.stderr == b"err\n"
        argv = await client.exec(["printf", "%s|", "two words", "$HOME", "*"])
        assert argv.stdout == b"two words|$HOME|*|"  # an argv is not shell-expanded

    with_client(agent, body)


def test_exec_env_and_cwd(agent: LocalAgent, workdir: Path) -> None:
    tool = workdir / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool ran in $(pwd)\n")
    tool.chmod(0o755)

    async def body(client: AgentClient) -> None:
        default = await client.exec("echo $PATH; echo $HOME; echo $LANG")
        path, home, lang = default.stdout.decode().splitlines()
        assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        assert (home, lang) == (str(agent.home), "C.UTF-8")  # the default user's home
        # the agent's own environment does not leak into commands
        leaked = await client.exec(["sh", "-c", "echo ${PYTEST_CURRENT_TEST:-clean}"])
        assert leaked.stdout == b"clean\n"
        custom = await client.exec(
            ["sh", "-c", 'echo "$FOO|$HOME"; pwd'],
            env={"FOO": "bar baz", "HOME": "/x"},
            cwd=str(workdir),
        )
        assert custom.stdout.decode().splitlines() == ["bar baz|/x", str(workdir)]
        relative = await client.exec(["./tool.sh"], cwd=str(workdir))
        assert relative.stdout == f"tool ran in {workdir}\n".encode()
        on_path = await client.exec(["tool.sh"], env={"PATH": f"/nowhere:{workdir}:/bin"})
        assert on_path.stdout.startswith(b"tool ran in ")
        assert (await client.exec(["pwd"])).stdout == f"{agent.home}\n".encode()
        as_root = await client.exec(["sh", "-c", "echo $HOME; id -u"], user="root")
        assert as_root.stdout == b"/root\n0\n"

    with_client(agent, body)


def test_exec_stdin(agent: LocalAgent) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(100):
            yield f"line {i}\n".encode()
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def body(client: AgentClient) -> None:
        assert (await client.exec(["cat"], stdin=b"hello")).stdout == b"hello"
        assert (await client.exec(["cat"], stdin=b"")).stdout == b""
        streamed = await client.exec(["wc", "-l"], stdin=pieces())
        assert streamed.stdout.strip() == b"100"
        big = os.urandom(3 << 20)
        echoed = await client.exec(["cat"], stdin=big)
        assert echoed.stdout == big
        # Without stdin, a command reads /dev/null and does not hang.
        assert (await client.exec(["cat"])).stdout == b""
        # A command that never reads its (large) stdin neither blocks the agent nor hangs.
        ignored = await client.exec(["sh", "-c", "sleep 0.2; echo done"], stdin=big)
        assert ignored.stdout == b"done\n"
        assert await client.ping() < 1

    with_client(agent, body)


def test_exec_stdin_source_failure_cancels_the_command(agent: LocalAgent) -> None:
    class SourceBrokeError(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        await asyncio.sleep(0.1)
        raise SourceBrokeError

    async def body(client: AgentClient) -> None:
        start = time.monotonic()
        with pytest.raises(SourceBrokeError):
            await client.exec(["cat"], stdin=failing())
        assert time.monotonic() - start < 5
        assert (await client.exec(["echo", "still fine"])).stdout == b"still fine\n"

    with_client(agent, body)


def test_command_not_found_and_not_executable(agent: LocalAgent, workdir: Path) -> None:
    script = workdir / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)

    async def body(client: AgentClient) -> None:
        missing = await client.exec(["warden-no-such-command"])
        assert missing.exit_code == 127
        assert missing.stderr == b"warden: warden-no-such-command: command not found\n"
        missing_path = await client.exec(["/no/such/binary"])
        assert missing_path.exit_code == 127
        assert b"warden: /no/such/binary" in missing_path.stderr
        not_exec = await client.exec([str(script)])
        assert not_exec.exit_code == 126
        assert b"Permission denied" in not_exec.stderr
        directory = await client.exec([str(workdir)])
        assert directory.exit_code == 126
        bad_cwd = await client.exec(["true"], cwd=str(workdir / "nope"))
        assert bad_cwd.exit_code == 127
        assert bad_cwd.stderr.startswith(b"warden: cd: ")
        shell_missing = await client.exec("warden-no-such-command")
        assert shell_missing.exit_code == 127  # from /bin/sh itself

    with_client(agent, body)


def test_invalid_exec_requests(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentError, match="argv"):
            await client.exec([])
        with pytest.raises(AgentError, match="timeout"):
            await client.exec(["true"], timeout=-1)
        nul = await client.exec(["/bin/tr\0ue"])
        assert (nul.exit_code, nul.stderr[:8]) == (127, b"warden: ")
        assert (await client.exec(["true"], cwd="/\0")).exit_code == 127
        assert (await client.exec(["true"], env={"A": "\0"})).exit_code == 126
        assert await client.ping() < 1

    with_client(agent, body)


def test_timeout_kills_the_process_group(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        start = time.monotonic()
        with pytest.raises(CommandTimeoutError, match="timeout=") as caught:
            await client.exec("echo $$; sleep 30 & echo $!; echo before; wait", timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 5
        result = caught.value.result
        assert isinstance(result, ExecResult)
        assert result.timed_out
        assert (result.exit_code, result.signal) == (None, signal.SIGKILL)
        shell_pid, sleep_pid, before = result.stdout.decode().split()
        assert before == "before"
        assert process_gone(int(shell_pid))
        assert process_gone(int(sleep_pid)), "the background child survived the timeout"
        fast = await client.exec(["true"], timeout=10)
        assert fast.exit_code == 0

    with_client(agent, body)


def test_timeout_when_the_process_closed_its_output(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        with pytest.raises(CommandTimeoutError):
            await client.exec("exec >&- 2>&-; sleep 30", timeout=0.3)

    with_client(agent, body)


def test_large_output(agent: LocalAgent, workdir: Path) -> None:
    blob = os.urandom(5 << 20)
    (workdir / "blob").write_bytes(blob)

    async def body(client: AgentClient) -> None:
        result = await client.exec(f"cat {workdir}/blob; cat {workdir}/blob >&2")
        assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(blob).digest()
        assert result.stderr == blob
        zeros = await client.exec(["head", "-c", str(5 << 20), "/dev/zero"])
        assert zeros.stdout == bytes(5 << 20)

    with_client(agent, body)


def test_output_callbacks(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        out: list[bytes] = []
        err: list[bytes] = []

        async def on_stderr(data: bytes) -> None:
            await asyncio.sleep(0)
            err.append(data)

        result = await client.exec(
            "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done",
            on_stdout=out.append,
            on_stderr=on_stderr,
        )
        assert len(out) >= 2  # streamed as it came, not in one piece at the end
        assert b"".join(out) == result.stdout == b"out1\nout2\nout3\n"
        assert b"".join(err) == result.stderr == b"err1\nerr2\nerr3\n"

    with_client(agent, body)


def test_concurrent_execs(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        start = time.monotonic()
        results = await asyncio.gather(
            *(client.exec(f"sleep 0.5; echo {i}; echo e{i} >&2") for i in range(10)),
            *(client.exec(["cat"], stdin=bytes([i]) * 100_000) for i in range(10)),
        )
        elapsed = time.monotonic() - start
        for i, result in enumerate(results[:10]):
            assert result.stdout == f"{i}\n".encode()
            assert result.stderr == f"e{i}\n".encode()
        for i, result in enumerate(results[10:]):
            assert result.stdout == bytes([i]) * 100_000
        assert elapsed < 3.0, f"10 x sleep 0.5 took {elapsed:.1f}s: execs ran serially"

    with_client(agent, body)


def test_cancelling_exec_kills_it(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        task, pid = await pid_of(client, "echo $$; exec sleep 30")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert process_gone(pid), "a cancelled exec kept running"
        assert (await client.exec(["echo", "ok"])).stdout == b"ok\n"

    with_client(agent, body)


def test_exec_round_trip_is_fast(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        await client.exec(["true"])  # warm up
        times = []
        for _ in range(20):
            start = time.perf_counter()
            await client.exec(["true"])
            times.append(time.perf_counter() - start)
        times.sort()
        assert times[len(times) // 2] < 0.05, times

    with_client(agent, body)


# --------------------------------------------------------------------------------------------
# files


def test_file_round_trip(agent: LocalAgent, workdir: Path) -> None:
    data = os.urandom(8 << 20)
    target = workdir / "deep" / "er" / "file.bin"

    async def body(client: AgentClient) -> None:
        size = await client.write_file(str(target), data, mode=0o600)
        assert size == len(data)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
        chunks = [chunk async for chunk in client.read_file(str(target))]
        assert all(0 < len(c) <= 1 << 20 for c in chunks)
        assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(data).digest()
        info = await client.stat(str(target))
        assert info == EntryInfo("file.bin", str(target), "file", len(data), 0o600, info.mtime)
        assert abs(info.mtime - target.stat().st_mtime) < 1

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 1 << 20):
                yield data[i : i + (1 << 20)]

        assert await client.write_file(str(target), pieces()) == len(data)  # replaces it
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert await client.read_file_bytes(str(target)) == data
        assert await client.write_file(str(workdir / "empty"), b"") == 0
        assert await client.read_file_bytes(str(workdir / "empty")) == b""
        leftovers = [p.name for p in target.parent.iterdir() if p.name != "file.bin"]
        assert leftovers == [], "temp files left behind"

    with_client(agent, body)


def test_file_ops(agent: LocalAgent, workdir: Path) -> None:
    async def body(client: AgentClient) -> None:
        await client.make_dir(str(workdir / "a" / "b"))
        await client.make_dir(str(workdir / "a" / "b"))  # parents=True: exists is fine
        await client.make_dir(str(workdir / "a" / "c"), parents=False, mode=0o700)
        assert stat.S_IMODE((workdir / "a" / "c").stat().st_mode) == 0o700
        await client.write_file(str(workdir / "a" / "f.txt"), b"12345")
        os.symlink("f.txt", workdir / "a" / "link")
        entries = await client.list_dir(str(workdir / "a"))
        assert [(e.name, e.type) for e in entries] == [
            ("b", "dir"),
            ("c", "dir"),
            ("f.txt", "file"),
            ("link", "symlink"),
        ]
        assert entries[2].size == 5
        assert entries[2].path == str(workdir / "a" / "f.txt")
        assert (await client.stat(str(workdir / "a"))).type == "dir"
        assert (await client.stat("/")).name == "/"

        with pytest.raises(GuestFileError) as caught:
            await client.remove(str(workdir / "a"))
        assert caught.value.errno == errno.ENOTEMPTY
        await client.remove(str(workdir / "a" / "link"))
        assert (workdir / "a" / "f.txt").exists()
        await client.remove(str(workdir / "a" / "f.txt"))
        await client.remove(str(workdir / "a"), recursive=True)
        assert not (workdir / "a").exists()

    with_client(agent, body)


def test_file_errors(agent: LocalAgent, workdir: Path) -> None:
    missing = str(workdir / "missing")
    (workdir / "file").write_bytes(b"x")

    async def expect(errno_: int, call: Awaitable[object]) -> GuestFileError:
        with pytest.raises(GuestFileError) as caught:
            await call
        assert caught.value.errno == errno_
        assert isinstance(caught.value, OSError)
        return caught.value

    async def body(client: AgentClient) -> None:
        error = await expect(errno.ENOENT, client.stat(missing))
        assert missing in str(error)
        assert "stat" in str(error)
        await expect(errno.ENOENT, client.list_dir(missing))
        await expect(errno.ENOENT, client.remove(missing))
        await expect(errno.ENOENT, client.read_file_bytes(missing))
        await expect(errno.EISDIR, client.read_file_bytes(str(workdir)))
        await expect(errno.ENOTDIR, client.list_dir(str(workdir / "file")))
        await expect(errno.EEXIST, client.make_dir(str(workdir / "file")))
        await expect(errno.EEXIST, client.make_dir(str(workdir), parents=False))
        await expect(errno.ENOENT, client.make_dir(str(workdir / "x" / "y"), parents=False))
        start = time.monotonic()
        big = bytes(32 << 20)
        await expect(errno.ENOENT, client.write_file(f"{missing}/f", big, parents=False))
        assert time.monotonic() - start < 5
        blocked = await expect(errno.EEXIST, client.write_file(f"{workdir}/file/f", b"x"))
        assert blocked.filename == f"{workdir}/file"  # the file in the way of the parents
        await expect(errno.ENOTDIR, client.write_file(f"{workdir}/file/f", b"x", parents=False))
        with pytest.raises(AgentError, match="absolute"):
            await client.stat("relative/path")
        assert not (workdir / "missing").exists()
        assert await client.ping() < 1  # the connection is still healthy

    with_client(agent, body)


def test_abandoned_read_is_cancelled(agent: LocalAgent, workdir: Path) -> None:
    (workdir / "big").write_bytes(os.urandom(16 << 20))

    async def body(client: AgentClient) -> None:
        stream = client.read_file(str(workdir / "big"))
        first = await anext(stream)
        assert first
        await stream.aclose()  # type: ignore[attr-defined]
        assert await client.read_file_bytes(str(workdir / "big")) == (workdir / "big").read_bytes()

    with_client(agent, body)


# --------------------------------------------------------------------------------------------
# connection failures and lifetime


def test_malformed_frame_from_host(agent: LocalAgent) -> None:
    raw = agent.sock.dup()  # the same connection, written behind the client's back

    async def main() -> None:
        client = await agent.connect()
        try:
            task, pid = await pid_of(client, "echo $$; exec sleep 30")
            raw.sendall(b"\x07" + bytes(11))  # protocol version 7
            with pytest.raises(ProtocolError, match="protocol"):
                await task
            assert client.closed
            with pytest.raises(ProtocolError):
                await client.ping()
            assert process_gone(pid), "the agent kept the exec of a broken session running"
        finally:
            await client.close()

    try:
        run(main())
    finally:
        raw.close()


class RawHost:
    """A host that speaks raw frames to the agent over its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        sock.settimeout(10)

    def until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        got: list[Frame] = []
        while not any(done(f) for f in got):
            data = self.sock.recv(65536)
            assert data, "the agent closed the connection"
            got.extend(self.decoder.feed(data))
        return got


def hello(nonce: str) -> bytes:
    return encode_json(FrameType.HELLO, 0, {"versions": [SESSION_VERSION], "nonce": nonce})


def test_agent_skips_junk_and_recovers_on_the_same_connection(agent: LocalAgent) -> None:
    """A session starts at a HELLO: what comes before one is skipped, and a protocol error
    ends the session (an ERROR is sent) and the agent hunts for the next HELLO."""
    host = RawHost(agent.sock)
    ping = encode_json(FrameType.REQUEST, 1, {"op": "ping"})
    host.sock.sendall(os.urandom(3000) + ping + hello("n1"))
    got = host.until(lambda f: f.type == FrameType.HELLO)
    assert [f.type for f in got] == [FrameType.HELLO], "the request before HELLO was answered"
    assert decode_json(got[0])["nonce"] == "n1"

    host.sock.sendall(
        b"\x07"  # protocol version 7: malformed
        + bytes(11)
        + encode_json(FrameType.REQUEST, 2, {"op": "ping"})  # skipped: no session
        + bytes(5000)
        + hello("n2")
        + encode_json(FrameType.REQUEST, 3, {"op": "ping"})
    )
    got = host.until(lambda f: f.type == FrameType.RESPONSE)
    assert [(f.type, f.request_id) for f in got] == [
        (FrameType.ERROR, 0),
        (FrameType.HELLO, 0),
        (FrameType.RESPONSE, 3),
    ]
    assert decode_json(got[0])["error"] == "protocol"
    assert decode_json(got[1])["nonce"] == "n2"
    host.sock.shutdown(socket.SHUT_WR)
    assert host.sock.recv(65536) == b""


def test_a_new_host_takes_over_a_stream_left_mid_frame(agent: LocalAgent) -> None:
    """A manager killed mid-frame, and the next one connecting before the agent saw an EOF:
    its HELLO is swallowed by the half-sent frame, so it pads and says HELLO again. The old
    session ends and its command is killed."""
    host = RawHost(agent.sock)
    host.sock.sendall(hello("old"))
    host.until(lambda f: f.type == FrameType.HELLO)
    host.sock.sendall(
        encode_json(FrameType.REQUEST, 1, {"op": "exec", "shell": "echo $$; exec sleep 30"})
    )
    (data,) = host.until(lambda f: f.type == FrameType.DATA)
    pid = int(data.payload)
    half = encode(Frame(FrameType.DATA, 1, Channel.STDIN, bytes(50_000)))[:20_000]
    host.sock.sendall(half + hello("new"))  # the new HELLO is swallowed
    time.sleep(0.3)
    host.sock.sendall(bytes(RESYNC_PADDING_SIZE) + hello("new"))
    got = host.until(lambda f: f.type == FrameType.HELLO)
    replies = [decode_json(f) for f in got if f.type in (FrameType.HELLO, FrameType.ERROR)]
    assert replies[-1]["nonce"] == "new"
    assert any(r.get("error") == "protocol" for r in replies[:-1]), replies
    assert process_gone(pid), "the old session's command survived the takeover"
    host.sock.sendall(encode_json(FrameType.REQUEST, 1, {"op": "ping"}))  # id 1 is free again
    (response,) = host.until(lambda f: f.type == FrameType.RESPONSE)
    assert decode_json(response)["ok"] is True


def test_client_resync_takes_over_a_stream_left_mid_frame(
    agent: LocalAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same takeover through AgentClient(resync=True), as the manager's reattach does it."""
    monkeypatch.setattr(client_module, "RESYNC_AFTER_S", 0.3)
    host = RawHost(agent.sock)
    host.sock.sendall(hello("old"))
    host.until(lambda f: f.type == FrameType.HELLO)
    host.sock.sendall(
        encode_json(FrameType.REQUEST, 1, {"op": "exec", "shell": "echo $$; exec sleep 30"})
        + encode(Frame(FrameType.DATA, 1, Channel.STDIN, bytes(50_000)))[:20_000]
    )

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=agent.sock, limit=1 << 20)
        client = await AgentClient.from_streams(reader, writer, timeout=10, resync=True)
        try:
            assert (await client.exec(["echo", "mine"])).stdout == b"mine\n"
        finally:
            await client.close()

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        encode(Frame(FrameType.REQUEST, 1, Channel.CONTROL, b"not json!")),
        encode(Frame(FrameType.REQUEST, 1, Channel.CONTROL, b"[1,2]")),
        encode(Frame(FrameType.REQUEST, 0, Channel.CONTROL, b'{"op":"ping"}')),
        encode(Frame(FrameType.RESPONSE, 1, Channel.CONTROL, b'{"ok":true}')),
        bytes([1, 3, 9, 0]) + bytes(8),  # unknown channel
        bytes([1, 3, 1, 0, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]),  # oversized
    ],
)
def test_agent_answers_garbage_with_error(agent: LocalAgent, garbage: bytes) -> None:
    sock = agent.sock
    sock.settimeout(10)
    decoder = FrameDecoder()
    sock.sendall(encode_json(FrameType.HELLO, 0, {"versions": [SESSION_VERSION]}) + garbage)
    got: list[Frame] = []
    while len(got) < 2:
        data = sock.recv(65536)
        assert data
        got.extend(decoder.feed(data))
    hello, error = got
    assert hello.type == FrameType.HELLO
    assert (error.type, error.request_id) == (FrameType.ERROR, 0)
    assert decode_json(error)["error"] == "protocol"


async def _break_a_session(path: Path) -> None:
    """A first host starts a command, then sends a malformed frame: the agent ends that
    session and its exec."""
    await asyncio.to_thread(wait_for_path, path)
    reader, writer = await asyncio.open_unix_connection(str(path))
    decoder = FrameDecoder()
    writer.write(encode_json(FrameType.HELLO, 0, {"versions": [SESSION_VERSION]}))
    assert (await read_frame(reader, decoder)).type == FrameType.HELLO
    writer.write(
        encode_json(FrameType.REQUEST, 1, {"op": "exec", "shell": "echo $$; exec sleep 30"})
    )
    data = await read_frame(reader, decoder)
    assert (data.type, data.channel) == (FrameType.DATA, Channel.STDOUT)
    pid = int(data.payload)
    writer.write(encode_json(FrameType.REQUEST, 1, {"op": "ping"}))  # id 1 is in use
    error = await read_frame(reader, decoder)
    assert (error.type, decode_json(error)["error"]) == (FrameType.ERROR, "protocol")
    assert process_gone(pid), "the exec of the broken session survived"
    writer.close()
    await writer.wait_closed()


def test_agent_reconnect_after_protocol_error(tmp_path: Path, user_tmp: Path) -> None:
    """The virtio port stays open across host connections; --listen mimics that."""
    path = tmp_path / "agent.sock"
    log = tmp_path / "agent.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*AGENT, "--listen", str(path), "--user-home", str(user_tmp)],
            stdin=subprocess.DEVNULL,
            stderr=log_file,
        )

    async def main() -> None:
        await _break_a_session(path)

        second = await AgentClient.connect_unix(path, timeout=10)
        assert second.agent_hello["pid"] == proc.pid
        assert (await second.exec(["echo", "again"])).stdout == b"again\n"
        # A host that disconnects abruptly: its running exec is killed too.
        task, pid = await pid_of(second, "echo $$; exec sleep 30")
        await second.close()
        with pytest.raises(SandboxClosedError):
            await task
        assert process_gone(pid)

        third = await AgentClient.connect_unix(path, timeout=10)
        await third.shutdown()
        assert third.closed

    try:
        run(main())
        _check_exit(proc, log, expect_clean=True)
        assert not path.exists(), "the agent left its socket behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_ends_the_agent(agent: LocalAgent) -> None:
    async def body(client: AgentClient) -> None:
        _task, pid = await pid_of(client, "echo $$; exec sleep 30")
        await client.shutdown()
        assert client.closed
        assert agent.proc.wait(timeout=10) == 0
        assert process_gone(pid)
        with pytest.raises(SandboxClosedError):
            await client.ping()
        with contextlib.suppress(SandboxClosedError):
            await _task

    with_client(agent, body)


def test_agent_exits_cleanly_on_eof_and_kills_its_children(agent: LocalAgent) -> None:
    async def main() -> int:
        client = await agent.connect()
        task, pid = await pid_of(client, "echo $$; sleep 30 & wait")
        await client.close()
        with pytest.raises(SandboxClosedError):
            await task
        return pid

    pid = run(main())
    assert agent.proc.wait(timeout=10) == 0
    assert process_gone(pid)


def test_pending_requests_fail_when_the_agent_dies(agent: LocalAgent, workdir: Path) -> None:
    agent.expect_clean_exit = False
    os.mkfifo(workdir / "fifo")  # reading it blocks until a writer shows up: never

    async def body(client: AgentClient) -> None:
        task, pid = await pid_of(client, "echo $$; exec sleep 30")
        reads = asyncio.create_task(client.read_file_bytes(str(workdir / "fifo")))
        await asyncio.sleep(0.1)
        agent.proc.kill()
        with pytest.raises(AgentError, match="connection"):
            await task
        with pytest.raises(AgentError):
            await reads
        with pytest.raises(AgentError):
            await client.ping()
        os.kill(pid, signal.SIGKILL)  # orphaned by the SIGKILLed agent

    with_client(agent, body)


# --------------------------------------------------------------------------------------------
# the client against a fake agent


async def fake_agent(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
) -> tuple[AgentClient | BaseException, asyncio.Task[None]]:
    """Connect a client to ``behaviour`` over a socketpair."""
    ours, theirs = socket.socketpair()
    fake_reader, fake_writer = await asyncio.open_connection(sock=theirs)
    task = asyncio.create_task(behaviour(fake_reader, fake_writer))
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        client: AgentClient | BaseException = await AgentClient.from_streams(
            reader, writer, timeout=0.5
        )
    except Exception as exc:  # noqa: BLE001 - returned to the test to inspect
        client = exc
    return client, task


async def read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> Frame:
    while True:
        frames = decoder.feed(await reader.read(1))
        if frames:
            return frames[0]


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> FrameDecoder:
    decoder = FrameDecoder()
    hello = await read_frame(reader, decoder)
    offer = decode_json(hello)
    assert offer["versions"] == [SESSION_VERSION]
    assert len(bytes.fromhex(offer["seed"])) == 32  # a fresh RNG seed for a restored guest
    assert abs(offer["time"] - time.time()) < 60
    reply = {"version": SESSION_VERSION, "agent": "fake", "pid": 1, "nonce": offer["nonce"]}
    writer.write(encode_json(FrameType.HELLO, 0, reply))
    return decoder


def wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_client_hello_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main() -> None:
        start = time.monotonic()
        client, task = await fake_agent(silent)
        assert isinstance(client, AgentTimeoutError)
        assert time.monotonic() - start < 3
        await task

    run(main())


def test_connect_unix_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(AgentTimeoutError, match="agent"):
            await AgentClient.connect_unix(tmp_path / "none.sock", timeout=0.3)
        assert 0.25 < time.monotonic() - start < 3

    run(main())


def test_client_rejects_malformed_frames() -> None:
    seen: list[Frame] = []

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = await greet(reader, writer)
        request = await read_frame(reader, decoder)
        assert decode_json(request)["op"] == "exec"
        writer.write(encode(Frame(FrameType.DATA, request.request_id, Channel.STDOUT, b"hi")))
        writer.write(b"\x01\x63" + bytes(10))  # unknown frame type
        seen.append(await read_frame(reader, decoder))
        writer.close()

    async def main() -> None:
        client, task = await fake_agent(garbage)
        assert isinstance(client, AgentClient)
        with pytest.raises(ProtocolError, match="type"):
            await client.exec(["true"])
        assert client.closed
        with pytest.raises(ProtocolError):
            await client.ping()
        await task
        await client.close()

    run(main())
    (error,) = seen
    assert (error.type, error.request_id) == (FrameType.ERROR, 0)
    assert decode_json(error)["error"] == "protocol"


def test_client_fails_pending_requests_when_the_connection_drops() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = await greet(reader, writer)
        for _ in range(3):
            await read_frame(reader, decoder)
        writer.close()

    async def main() -> None:
        client, task = await fake_agent(drop)
        assert isinstance(client, AgentClient)
        results = await asyncio.gather(
            client.exec(["sleep", "100"]),
            client.stat("/x"),
            client.read_file_bytes("/y"),
            return_exceptions=True,
        )
        for result in results:
            assert isinstance(result, AgentError), result
            assert "closed the connection" in str(result)
        await task
        await client.close()

    run(main(), timeout=10)


def test_client_ignores_frames_of_unknown_requests() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = await greet(reader, writer)
        request = await read_frame(reader, decoder)
        writer.write(encode(Frame(FrameType.DATA, 999, Channel.STDOUT, b"stray")))
        writer.write(encode_json(FrameType.RESPONSE, 998, {"ok": True}))
        writer.write(encode_json(FrameType.RESPONSE, request.request_id, {"ok": True}))
        await reader.read()
        writer.close()

    async def main() -> None:
        client, task = await fake_agent(chatty)
        assert isinstance(client, AgentClient)
        assert await client.ping() >= 0
        await client.close()
        await task

    run(main(), timeout=10)


def test_client_skips_what_precedes_its_answer() -> None:
    """Frames from an earlier host's session (stale output, window acknowledgements, an answer
    to another HELLO, garbage) come before the answer to ours; the client waits them out."""

    async def stale(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        offer = decode_json(await read_frame(reader, decoder))
        writer.write(
            encode(Frame(FrameType.DATA, 7, Channel.STDOUT, b"old output"))
            + encode(Frame(FrameType.DATA, 3, Channel.XFER, bytes(12)))
            + encode_json(FrameType.HELLO, 0, {"version": 2, "nonce": "somebody else"})
            + encode_json(FrameType.ERROR, 0, {"error": "protocol", "message": "stale"})
            + b"\x63" * 40  # not a frame at all
            + encode_json(FrameType.HELLO, 0, {"version": 2, "pid": 1, "nonce": offer["nonce"]})
        )
        request = await read_frame(reader, decoder)
        writer.write(encode_json(FrameType.RESPONSE, request.request_id, {"ok": True}))
        await reader.read()
        writer.close()

    async def main() -> None:
        client, task = await fake_agent(stale)
        assert isinstance(client, AgentClient), client
        assert await client.ping() >= 0
        await client.close()
        await task

    run(main(), timeout=10)


def test_client_reports_an_agent_that_refuses_its_hello() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offer = decode_json(await read_frame(reader, FrameDecoder()))
        report = {"error": "protocol", "message": "no common version", "nonce": offer["nonce"]}
        writer.write(encode_json(FrameType.ERROR, 0, report))
        await reader.read()
        writer.close()

    async def main() -> None:
        client, task = await fake_agent(refuse)
        assert isinstance(client, ProtocolError), client
        assert "no common version" in str(client)
        assert "rebuild the image (`warden image build`)" in str(client)
        await task

    run(main(), timeout=10)
