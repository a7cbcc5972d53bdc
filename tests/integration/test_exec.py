"""Commands in a real microVM under TCG: exit codes, stdin, env, cwd, output, timeouts.

Every test runs in both modes (``sdk``: embedded, or through a `warden serve` daemon).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

import warden
from warden import CommandTimeoutError, Sandbox

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sbx(sdk: Any) -> Iterator[Sandbox]:
    with sdk.Sandbox.create(memory_mib=256, env={"FROM_SPEC": "spec-value"}) as s:
        yield s


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes(sbx: Sandbox, code: int) -> None:
    assert sbx.commands.run(f"exit {code}").exit_code == code


def test_argv_runs_without_a_shell(sbx: Sandbox) -> None:
    r = sbx.commands.run(["echo", "$HOME", "a b"])
    assert r.stdout == "$HOME a b\n"
    assert r.exit_code == 0


def test_stdout_and_stderr_are_separate(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)


@pytest.mark.parametrize("size", [10, 256_000])  # remote: inline, then streamed
def test_stdin(sbx: Sandbox, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    r = sbx.commands.run(["sha256sum"], stdin=data)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_echoed_as_it_is_read_does_not_deadlock(sbx: Sandbox) -> None:
    """cat writes its output while its input still comes: neither direction may wait for the
    other (in remote mode, stdin streams on its own request)."""
    data = hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32)
    r = sbx.commands.run("cat; echo end >&2", stdin=data, timeout=120)
    assert r.stdout_bytes == data
    assert r.stderr == "end\n"


def test_env_from_spec_and_from_the_command(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo $FROM_SPEC $FROM_CMD", env={"FROM_CMD": "cmd-value"})
    assert r.stdout == "spec-value cmd-value\n"


def test_cwd(sbx: Sandbox) -> None:
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("pwd").stdout == "/home/user\n"  # the user's home by default


def test_bad_cwd_is_an_error_not_a_hang(sbx: Sandbox) -> None:
    r = sbx.commands.run(["true"], cwd="/no/such/dir")
    assert r.exit_code != 0
    assert "/no/such/dir" in r.stderr


def test_command_not_found(sbx: Sandbox) -> None:
    r = sbx.commands.run(["no-such-command-xyz"])
    assert r.exit_code == 127
    assert "no-such-command-xyz" in r.stderr


def test_fifty_mib_of_output(sbx: Sandbox) -> None:
    size = 50 * 1024 * 1024
    script = f"head -c {size} /dev/zero | tr '\\0' 'x'"
    r = sbx.commands.run(script, timeout=300, max_output=size)
    assert (r.exit_code, r.truncated) == (0, False)
    assert len(r.stdout_bytes) == size
    assert r.stdout_bytes.count(b"x") == size


_STREAM_SCRIPT = r"""
import hashlib, os, sys
size = int(sys.argv[1])
data = os.urandom(1 << 20)
digests = {1: hashlib.sha256(), 2: hashlib.sha256()}
def put(fd, piece):
    digests[fd].update(piece)
    view = memoryview(piece)
    while view:
        view = view[os.write(fd, view):]
sent = i = 0
while sent < size:
    n = min(size - sent, 1 + (i * 40009) % 300007)  # odd sizes: frames never line up
    at = (i * 7919) % (len(data) - n + 1)
    put(1, data[at : at + n])
    sent += n
    if i % 3 == 0:
        put(2, b"err %d " % i + data[n % 1000 : n % 1000 + i % 5000])
    i += 1
with open("/tmp/stream-digests", "w") as f:
    f.write(digests[1].hexdigest() + " " + digests[2].hexdigest())
"""


def test_large_interleaved_output_arrives_whole_and_in_order(sbx: Sandbox) -> None:
    """64 MiB of stdout in odd-sized writes with stderr between them: every byte arrives, in
    order, on its own stream (a framing slip in the agent's send path breaks the digests)."""
    size = 64 * 1024 * 1024
    sbx.files.write("/tmp/stream.py", _STREAM_SCRIPT)
    r = sbx.commands.run(["python3", "/tmp/stream.py", str(size)], max_output=size, timeout=300)
    assert (r.exit_code, r.truncated) == (0, False), r.stderr_bytes[-500:]
    assert len(r.stdout_bytes) == size
    out_digest, err_digest = sbx.commands.run("cat /tmp/stream-digests").stdout.split()
    assert hashlib.sha256(r.stdout_bytes).hexdigest() == out_digest
    assert hashlib.sha256(r.stderr_bytes).hexdigest() == err_digest
    assert r.stderr_bytes.startswith(b"err 0 ")


_FAULTING_WRITE_SCRIPT = r"""
import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
page = mmap.PAGESIZE
addr = libc.mmap(None, 2 * page, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|ANON
libc.munmap(addr + page, page)
ctypes.memset(addr, ord("x"), page)
for fd in (1, 2, 1):
    os.write(fd, b"before\n")
    # 100 bytes, then the unmapped page: EFAULT, and an empty buffer left in the pipe...
    assert libc.write(fd, addr + page - 100, 2 * page) == -1
    os.write(fd, b"a" * page)  # ...which a whole page written next does not fill
print("end")
"""


def test_a_faulting_write_does_not_break_the_output_channel(sbx: Sandbox) -> None:
    """A write(2) that faults leaves an empty buffer in the pipe (pipe_write in fs/pipe.c).
    The agent must pass over it: spliced on to the virtio port, it would be a zero-length
    descriptor, and QEMU then stops the device (the VM's agent would be gone)."""
    sbx.files.write("/tmp/fault.py", _FAULTING_WRITE_SCRIPT)
    r = sbx.commands.run(["python3", "/tmp/fault.py"], timeout=60)
    page = "before\n" + "a" * 4096
    assert (r.exit_code, r.stdout, r.stderr) == (0, page * 2 + "end\n", page)
    assert sbx.commands.run("echo ok").stdout == "ok\n"


def test_commands_run_as_the_unprivileged_user_by_default(sbx: Sandbox, sdk: Any) -> None:
    r = sbx.commands.run("id -u; id -g; echo $HOME; touch /root/x")
    assert r.stdout.splitlines() == ["1000", "1000", "/home/user"]
    assert r.exit_code != 0 and "Permission denied" in r.stderr
    # The daemon's caller is its admin here, whom the default policy grants exec-as-root.
    r = sbx.commands.run("id -u; touch /root/x", user="root")
    assert (r.stdout, r.exit_code) == ("0\n", 0)


def test_max_output_caps_what_is_kept_and_says_so(sbx: Sandbox) -> None:
    size = 3 * 1024 * 1024 + 5
    seen = [0, 0]

    def out(text: str) -> None:
        seen[0] += len(text)

    def err(text: str) -> None:
        seen[1] += len(text)

    script = f"head -c {size} /dev/zero | tr '\\0' o; head -c 100 /dev/zero | tr '\\0' e >&2"
    r = sbx.commands.run(script, max_output=1000, on_stdout=out, on_stderr=err, timeout=120)
    assert (r.exit_code, r.truncated) == (0, True)
    assert r.stdout == "o" * 1000  # stdout cut...
    assert r.stderr == "e" * 100  # ...stderr, under the cap, whole
    assert seen == [size, 100]  # the handlers saw everything
    r = sbx.commands.run("echo small", max_output=6)
    assert (r.stdout, r.truncated) == ("small\n", False)
    r = sbx.commands.run("echo small", max_output=0)
    assert (r.stdout, r.truncated) == ("", True)
    with pytest.raises(warden.SpecError, match="max_output"):
        sbx.commands.run("true", max_output=-1)


def test_streaming_callbacks_see_output_as_it_comes(sbx: Sandbox) -> None:
    seen: list[str] = []
    r = sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == r.stdout == "line1\nline2\nline3\n"


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    with pytest.raises(CommandTimeoutError, match="timeout"):
        sbx.commands.run("sleep 1000 & echo $! > /tmp/sleeper; wait", timeout=1.5)
    pid = sbx.commands.run("cat /tmp/sleeper").stdout.strip()
    assert pid.isdigit()
    # The whole process group is gone, the background sleep included.
    # The loop exits 0 only once the process is gone, and 1 if it outlives 5 s.
    gone = sbx.commands.run(
        f"for i in $(seq 25); do [ -d /proc/{pid} ] || exit 0; sleep 0.2; done; exit 1"
    )
    assert gone.exit_code == 0, f"the background sleep (pid {pid}) outlived the timeout's kill"


def test_killed_by_a_signal(sbx: Sandbox) -> None:
    r = sbx.commands.run("kill -TERM $$")
    assert r.signal == 15
    assert r.exit_code == 128 + 15


def test_ten_concurrent_commands_in_one_vm(sbx: Sandbox) -> None:
    """Each command waits until all ten have started: this only finishes if they overlap."""

    async def main() -> list[warden.CommandResult]:
        inner = sbx._inner
        await inner.commands.run("rm -rf /tmp/barrier && mkdir /tmp/barrier")
        script = (
            "touch /tmp/barrier/$N; "
            "while [ $(ls /tmp/barrier | wc -l) -lt 10 ]; do sleep 0.05; done; echo done $N"
        )
        return await asyncio.gather(
            *(inner.commands.run(script, env={"N": str(i)}, timeout=120) for i in range(10))
        )

    from warden.sdk import _portal

    results = _portal.call(main())
    assert [r.stdout for r in results] == [f"done {i}\n" for i in range(10)]


def test_info_and_ping(sbx: Sandbox) -> None:
    info = sbx.info()
    assert str(info["kernel"]).endswith("cloud-amd64")
    assert isinstance(info["mem_total_kib"], int) and info["mem_total_kib"] > 100_000
    assert isinstance(info["uptime_s"], float) and info["uptime_s"] > 0
    assert 0 < sbx.ping() < 5


async def test_async_sandbox_has_the_same_shape(sdk: Any) -> None:
    async with await sdk.AsyncSandbox.create(memory_mib=192) as sbx:
        assert isinstance(sbx, warden.AsyncSandbox)
        r = await sbx.commands.run(["python3", "-c", "print(6 * 7)"])
        assert r.stdout == "42\n"
        await sbx.files.write("/tmp/x", b"abc")
        assert await sbx.files.read("/tmp/x", format="bytes") == b"abc"
    assert not sbx.is_running
