"""The workload cannot reach the agent: a real VM (embedded SDK), attacked from inside.

By default a command runs as the unprivileged ``user`` (uid 1000). As that user, a Python
script in the guest tries every way in that a root workload had (issue 6): open the agent's
virtio port, the transfer-window disk and the console; ptrace PID 1 (the agent); copy the
port's fd out of it with pidfd_getfd; read its memory; kill or stop it; write the agent's
code or the Python it runs. Every attempt must fail, and the agent must answer afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

import warden
from warden.sdk import _portal

pytestmark = pytest.mark.vm

ATTACK = r"""
import ctypes, errno, glob, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
results = {}

def attempt(name, action):
    try:
        action()
        results[name] = "succeeded"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))

def check(ret, what):
    if ret < 0:
        raise OSError(ctypes.get_errno(), what)
    return ret

def open_close(path, flags):
    os.close(os.open(path, flags))

def pidfd_getfd():
    pidfd = check(libc.syscall(434, 1, 0), "pidfd_open")  # pidfd_open(1, 0)
    try:
        for target in range(0, 32):
            fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd(pidfd, target, 0)
            if fd >= 0:
                return  # an fd of the agent in the workload's hands
            if ctypes.get_errno() != errno.EBADF:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
        raise OSError(errno.EBADF, "pidfd_getfd: no fd")
    finally:
        os.close(pidfd)

def write_new(path):
    with open(path, "w") as f:
        f.write("owned = True\n")

def append(path):
    with open(path, "a") as f:
        f.write("# owned\n")

devices = glob.glob("/dev/vport*") + glob.glob("/dev/vd*") + ["/dev/ttyS0", "/dev/console"]
results["devices"] = devices
for device in devices:
    attempt("open rw " + device, lambda d=device: open_close(d, os.O_RDWR))
    attempt("open ro " + device, lambda d=device: open_close(d, os.O_RDONLY))
attempt("ptrace attach 1", lambda: check(libc.ptrace(16, 1, 0, 0), "ptrace"))
attempt("pidfd_getfd 1", pidfd_getfd)
attempt("read /proc/1/mem", lambda: open_close("/proc/1/mem", os.O_RDONLY))
attempt("read /proc/1/environ", lambda: open_close("/proc/1/environ", os.O_RDONLY))
attempt("kill -STOP 1", lambda: os.kill(1, 19))
attempt("kill -9 1", lambda: os.kill(1, 9))
attempt("append agent_main.py", lambda: append("/usr/lib/warden/agent_main.py"))
attempt("append session.py", lambda: append("/usr/lib/warden/warden/guest/session.py"))
attempt("new guest module", lambda: write_new("/usr/lib/warden/warden/guest/evil.py"))
attempt("append os.py", lambda: append(os.__file__))
attempt("sysrq", lambda: append("/proc/sysrq-trigger"))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[warden.Sandbox]:
    with warden.Sandbox.create(timeout=180) as sb:
        yield sb


def test_the_workload_cannot_reach_the_agent(sandbox: warden.Sandbox) -> None:
    result = sandbox.commands.run(["python3", "-c", ATTACK], timeout=120)
    assert result.exit_code == 0, result.stderr
    results = json.loads(result.stdout)
    devices = results.pop("devices")
    assert any(d.startswith("/dev/vport") for d in devices), devices  # the port was found
    assert {"/dev/vda", "/dev/vdb"} <= set(devices), devices  # rootfs and transfer window
    succeeded = [name for name, outcome in results.items() if outcome == "succeeded"]
    assert succeeded == [], results
    assert results["ptrace attach 1"] == "EPERM"
    assert results["pidfd_getfd 1"] == "EPERM"
    assert results["kill -9 1"] == results["kill -STOP 1"] == "EPERM"
    assert results["append agent_main.py"] == "EACCES"
    # ... and the agent still answers, as itself
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert sandbox.commands.run("id -u", user="root").stdout == "0\n"


def test_default_and_root_accounts(sandbox: warden.Sandbox) -> None:
    default = sandbox.commands.run("id -u; id -g; id -G; pwd; echo $HOME $USER")
    assert default.stdout.splitlines() == ["1000", "1000", "1000", "/home/user", "/home/user user"]
    root = sandbox.commands.run("id -u; pwd; echo $HOME", user="root")
    assert root.stdout.splitlines() == ["0", "/root", "/root"]


REGAIN = r"""
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
out = {k: status[k].split() for k in ("Uid", "Gid", "CapPrm", "CapEff", "Groups")}
for name, call in (("setuid", lambda: os.setuid(0)), ("seteuid", lambda: os.seteuid(0)),
                   ("setresuid", lambda: os.setresuid(0, 0, 0))):
    try:
        call()
        out[name] = "succeeded"
    except OSError as exc:
        out[name] = exc.errno
print(json.dumps(out))
"""


def test_a_command_cannot_regain_root(sandbox: warden.Sandbox) -> None:
    """The command's real, effective and saved ids are the user's, with no capabilities."""
    result = sandbox.commands.run(["python3", "-c", REGAIN], timeout=120)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["Uid"] == ["1000"] * 4 and out["Gid"] == ["1000"] * 4, out
    assert out["CapPrm"] == out["CapEff"] == ["0000000000000000"], out
    assert out["Groups"] == [], out
    assert out["setuid"] == out["seteuid"] == out["setresuid"] == 1, out  # EPERM
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_signals_to_the_agent_threads_do_nothing(sandbox: warden.Sandbox) -> None:
    """Hammer the agent's threads with signals while other commands start: it keeps serving.

    An exec thread has the user's real uid while it starts a command, so some of these signals
    are allowed then; without pid1.guard_signals, SIGTERM, SIGINT or SIGUSR1 killed PID 1 and
    the guest panicked.
    """
    script = (
        "end=$(($(date +%s) + 4)); while [ $(date +%s) -lt $end ]; do "
        "for t in /proc/1/task/*; do for s in 1 2 10 11 15 32 34 64; do kill -$s ${t##*/}; "
        "done; done 2>/dev/null; done; echo done"
    )

    async def main() -> list[str]:
        inner = sandbox._inner
        attacker = asyncio.create_task(inner.commands.run(script, timeout=60))
        outputs = []
        while not attacker.done():
            outputs.append((await inner.commands.run("echo ok")).stdout)
        assert (await attacker).stdout == "done\n"
        return outputs

    outputs = _portal.call(main())
    assert outputs and set(outputs) == {"ok\n"}, outputs
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_a_file_written_by_default_belongs_to_the_user(sandbox: warden.Sandbox) -> None:
    sandbox.files.write("/home/user/mine.txt", b"data")
    owner = sandbox.commands.run("stat -c %u:%g:%a /home/user/mine.txt").stdout
    assert owner == "1000:1000:644\n"
    with pytest.raises(warden.GuestFileError):
        sandbox.files.write("/root/nope.txt", b"data")  # root's home is not the user's
    sandbox.files.write("/root/yes.txt", b"data", user="root")
    assert sandbox.commands.run("stat -c %u /root/yes.txt", user="root").stdout == "0\n"


def test_nothing_the_agent_trusts_is_writable_by_the_user(sandbox: warden.Sandbox) -> None:
    trusted = "/usr/lib/warden /usr/lib/python3* /usr/bin /usr/sbin /usr/lib/x86_64-linux-gnu"
    writable = sandbox.commands.run(f"find {trusted} -writable 2>/dev/null | head")
    assert writable.stdout == ""
    # no setuid or setgid binary gives the user a way to root
    setid = sandbox.commands.run("find / -xdev -perm /6000 -type f 2>/dev/null", user="root")
    assert setid.stdout == ""
    home = sandbox.commands.run("stat -c %U:%G:%a /home/user /usr/lib/warden", user="root")
    assert home.stdout.splitlines() == ["user:user:700", "root:root:755"]
