"""The inside of the jail. Run as ``python -I -S launcher.py --fd N -- QEMU ARGV...`` as root,
already in new mount, PID and network namespaces (``unshare``), it reads its config from fd N
(a socket), builds the VM's root, drops every privilege and execs QEMU. Stdlib
only, and imports nothing of warden: it runs from its path.

The steps, in order (docs/security.md, "The jail"), after Firecracker's jailer:

1. report our host pid and start time on the status socket (the manager tracks QEMU by them);
2. join the VM's cgroups, so QEMU runs under its limits from its first instruction;
3. mount a tmpfs as the new root and put in it, read-only, only what QEMU needs: its binary,
   libraries and firmware, and the VM's kernel, initrd and rootfs; the image files are
   root's (0600), so they are bind-mounted *idmapped*: inside the jail they belong to the
   VM's uid, on the host they stay root's; for a clone, a procfs that shows only QEMU itself
   (it opens its template's RAM, a passed memfd, as ``/proc/self/fd/N``);
4. make the /dev nodes QEMU uses (null, zero, urandom; kvm only under KVM);
5. ``pivot_root`` into it, detach the old root, remount the new one read-only;
6. set the rlimits (nofile, nproc, core 0, fsize);
7. drop the capability bounding set, clear the ambient and inheritable sets, take the VM's
   gid and uid (no supplementary groups), set no_new_privs and the parent-death signal, and
   check that the parent is still the one we started under;
8. move the passed fds to the numbers QEMU's argv names and close every other fd;
9. exec QEMU with an empty environment. Its ``-sandbox`` option turns on seccomp.

Any failure is written to the status socket (``error <step>: <why>``) and to stderr
(qemu.log), and the launcher exits 1 before QEMU runs. Just before the exec it writes ``ok``.

``--probe FILE`` tries steps 3-7 with ``FILE`` as the image file and prints which worked, as
JSON (``warden doctor`` and the launch's feature check use it).
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing, json, signal and contextlib would cost ~10 ms of every launch
    from collections.abc import Callable
    from typing import Any

CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
SYS_CAPSET = 126
SYS_PIVOT_ROOT = 155
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
SIGKILL = 9
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522

DEVICES = {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9), "kvm": (10, 232)}
"""The /dev nodes a jail may hold: (major, minor)."""

RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
    "fsize": resource.RLIMIT_FSIZE,
}

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    """A step of the jail failed: ``step`` names it."""

    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"{step}: {why}")
        self.step = step


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _check(result: int, step: str, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise JailError(step, f"{what}: {os.strerror(err)} (errno {err})")
    return result


def _syscall(step: str, what: str, number: int, *args: object) -> int:
    return _check(_libc.syscall(ctypes.c_long(number), *args), step, what)


def _mount(
    step: str, src: str | None, target: str, fstype: str | None, flags: int, data: str = ""
) -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        step,
        f"mount {src or ''} on {target}",
    )


def _prctl(step: str, option: int, arg: int, arg3: int = 0) -> None:
    _check(
        _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0),
        step,
        f"prctl({option})",
    )


# -- 1. identity of this process, seen from the host ----------------------------------------


def host_identity() -> tuple[int, int, int]:
    """Our pid, start time and parent pid in the host's PID namespace.

    /proc is still the host's procfs here, so ``/proc/self`` names our host pid even though
    we are PID 1 of a new namespace.
    """
    pid = int(os.readlink("/proc/self"))
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read().decode()
    fields = text[text.rindex(")") + 2 :].split()
    return pid, int(fields[19]), int(fields[1])


# -- 3. the new root ------------------------------------------------------------------------


def _jail_path(root: str, host_path: str) -> str:
    return root + host_path


def _make_dir(root: str, host_dir: str) -> None:
    path = _jail_path(root, host_dir)
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)


def mirror(root: str, path: str, _depth: int = 0) -> str:
    """Make ``path``'s directories and symlinks under ``root`` as they are on the host;
    return the host path of the file it names (with every symlink resolved)."""
    if _depth > 16:
        raise JailError("root", f"too many symlinks under {path}")
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, name in enumerate(parts):
        host = os.path.join(current, name)
        info = os.lstat(host)
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(host)
            link = _jail_path(root, host)
            if not os.path.lexists(link):
                _make_dir(root, current)
                os.symlink(target, link)
            rest = "/".join(parts[i + 1 :])
            resolved = os.path.normpath(os.path.join(current, target))
            return mirror(root, os.path.join(resolved, rest) if rest else resolved, _depth + 1)
        if i < len(parts) - 1:
            current = host
    _make_dir(root, current)
    return os.path.join(current, parts[-1]) if parts else "/"


def _mount_point(root: str, host_file: str) -> str:
    target = _jail_path(root, host_file)
    if not os.path.exists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o400))
    return target


def bind_plain(root: str, path: str, *, writable: bool = False) -> None:
    """Bind the host file ``path`` at the same path in the jail: nosuid, nodev, read-only
    unless ``writable`` (then noexec too)."""
    host = mirror(root, path)
    target = _mount_point(root, host)
    _mount("root", host, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    _mount("root", None, target, None, flags | (MS_NOEXEC if writable else MS_RDONLY))


def mount_proc(root: str) -> None:
    """A procfs at ``/proc`` in the jail that shows only processes (``subset=pid``: no
    ``/proc/sys``, no kernel files) and, of those, only QEMU's own uid's (``hidepid``): in
    the jail's PID namespace, QEMU alone. A clone's QEMU opens its template's RAM, a sealed
    memfd it was passed as an fd, as ``/proc/self/fd/N``: a memfd cannot be bind-mounted."""
    path = _jail_path(root, "/proc")
    os.makedirs(path, mode=0o555, exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    _mount("root", "proc", path, "proc", flags, "subset=pid,hidepid=invisible")


def idmap_userns(uid: int, gid: int) -> int:
    """An fd of a new user namespace whose id 0 is ``uid``/``gid`` on the host.

    An idmapped mount through it shows files of the host's root as the VM's uid's.
    """
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child of a fork)
        os.close(ready_r)
        os.close(done_w)
        code = 0
        try:
            _check(_libc.unshare(CLONE_NEWUSER), "idmap", "unshare(CLONE_NEWUSER)")
            os.write(ready_w, os.readlink("/proc/self").encode())
            os.read(done_r, 1)
        except BaseException:  # noqa: BLE001 (a forked child must never return)
            code = 1
        os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        host_pid = os.read(ready_r, 32).decode()
        if not host_pid:
            raise JailError("idmap", "could not make a user namespace")
        for name, outer in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{host_pid}/{name}", "w") as f:
                f.write(f"0 {outer} 1\n")
        return os.open(f"/proc/{host_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(child, 0)


def bind_idmapped(root: str, path: str, userns: int, *, writable: bool = False) -> None:
    """Bind the host file ``path`` at the same path in the jail, its owner mapped by
    ``userns`` (root's file becomes the VM uid's), nosuid, nodev, noexec; read-only unless
    ``writable``."""
    host = mirror(root, path)
    target = _mount_point(root, host)
    fd = _syscall(
        "idmap",
        f"open_tree {host}",
        SYS_OPEN_TREE,
        ctypes.c_int(AT_FDCWD),
        host.encode(),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    try:
        flags = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        attr = _MountAttr(flags | (0 if writable else MOUNT_ATTR_RDONLY), 0, 0, userns)
        _syscall(
            "idmap",
            f"mount_setattr (idmap) {host}",
            SYS_MOUNT_SETATTR,
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        _syscall(
            "idmap",
            f"move_mount {host}",
            SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            target.encode(),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
    finally:
        os.close(fd)


def make_devices(root: str, names: list[str], uid: int | None, gid: int | None) -> None:
    """The /dev nodes QEMU needs; ``kvm`` belongs to the VM's uid, as in Firecracker."""
    os.makedirs(_jail_path(root, "/dev"), mode=0o755, exist_ok=True)
    for name in names:
        major, minor = DEVICES[name]
        path = _jail_path(root, f"/dev/{name}")
        mode = 0o660 if name == "kvm" else 0o666
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)
        if name == "kvm" and uid is not None and gid is not None:
            os.chown(path, uid, gid)


def enter_root(root: str) -> None:
    """``pivot_root`` into ``root``, drop the old root, make the new one read-only."""
    os.chdir(root)
    _syscall("pivot_root", "pivot_root", SYS_PIVOT_ROOT, b".", b".")
    _check(_libc.umount2(b".", MNT_DETACH), "pivot_root", "detach the old root")
    os.chdir("/")
    _mount("pivot_root", None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def build_root(cfg: dict[str, Any]) -> None:
    """Steps 3-5: the new root, its files and /dev nodes, and the pivot into it."""
    root = cfg["root"]
    os.umask(0o022)  # the jail's dirs: QEMU's uid must pass through them
    _mount("root", "tmpfs", root, "tmpfs", MS_NOSUID)
    os.chmod(root, 0o755)  # noqa: S103 (the jail's root: QEMU's uid passes through it)
    for path in cfg["ro_files"]:
        bind_plain(root, path)
    if cfg["uid"] is None:  # QEMU stays root (without capabilities): it reads root's files
        for path in cfg["id_files"]:
            bind_plain(root, path)
        for path in cfg["rw_files"]:
            bind_plain(root, path, writable=True)
    elif cfg["id_files"] or cfg["rw_files"]:
        userns = idmap_userns(cfg["uid"], cfg["gid"])
        try:
            for path in cfg["id_files"]:
                bind_idmapped(root, path, userns)
            for path in cfg["rw_files"]:
                bind_idmapped(root, path, userns, writable=True)
        finally:
            os.close(userns)
    if cfg.get("proc"):
        mount_proc(root)
    make_devices(root, cfg["devices"], cfg["uid"], cfg["gid"])
    enter_root(root)


# -- 6, 7. limits and privileges ------------------------------------------------------------


def set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        try:
            resource.setrlimit(RLIMITS[name], (value, value))
        except (OSError, ValueError) as exc:
            raise JailError("rlimits", f"{name}={value}: {exc}") from None


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_capabilities(last: int) -> None:
    """Empty the bounding and ambient sets (while we still may), so nothing regains a
    capability later; the uid change then clears the permitted and effective sets."""
    for cap in range(last + 1):
        _prctl("capabilities", PR_CAPBSET_DROP, cap)
    _prctl("capabilities", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_inheritable() -> None:
    """capset(0, 0, 0): no effective, permitted or inheritable capability left."""
    header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _syscall("capabilities", "capset", SYS_CAPSET, ctypes.byref(header), ctypes.byref(data))


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise JailError("uid", f"still {os.getresuid()} {os.getresgid()}")


def tie_to_parent(stat_fd: int, parent: int) -> None:
    """Die with our parent (the ``unshare`` that waits for us), then check it is still ours:
    the uid change cleared the parent-death signal that ``unshare --kill-child`` set, and the
    parent may have died before we set it again."""
    _prctl("pdeathsig", PR_SET_PDEATHSIG, SIGKILL)
    text = os.pread(stat_fd, 4096, 0).decode()
    ppid = int(text[text.rindex(")") + 2 :].split()[1])
    if ppid != parent:
        raise JailError("pdeathsig", f"the parent {parent} is gone (now {ppid})")


def drop_privileges(cfg: dict[str, Any], last_cap: int, stat_fd: int, parent: int) -> None:
    set_rlimits(cfg["rlimits"])
    drop_capabilities(last_cap)
    if cfg["uid"] is not None:
        become(cfg["uid"], cfg["gid"])
    clear_inheritable()
    if cfg["nnp"]:
        _prctl("no_new_privs", PR_SET_NO_NEW_PRIVS, 1)
    if cfg["pdeathsig"]:
        tie_to_parent(stat_fd, parent)


# -- 8, 9. fds and exec ---------------------------------------------------------------------


def arrange_fds(pairs: list[list[int]], keep: int) -> int:
    """Put each passed fd (source, target) at its target number, keep the status fd
    ``keep`` (close-on-exec, moved just above the targets) and close every other fd.

    Returns the status fd's new number.
    """
    first_free = 3 + len(pairs)
    moved = [(os.dup(src), dst) for src, dst in pairs]  # above every source and target
    status = os.dup(keep)
    for tmp, dst in moved:
        os.dup2(tmp, dst)  # inheritable: QEMU gets it
    status_fd = os.dup2(status, first_free, inheritable=False)
    os.closerange(first_free + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 4096)
    return status_fd


def _report(fd: int, line: str) -> None:
    try:  # noqa: SIM105 (contextlib would cost an import)
        os.write(fd, (line + "\n").encode())
    except OSError:  # the manager gave up on us: the exit tells it
        pass


def read_config(fd: int) -> dict[str, Any]:
    """The jail's config, as the manager wrote it to our end of the status socket: its length
    (4 bytes, big-endian), then the dict in ``marshal``'s format (the same Python wrote it;
    json would cost an import of ``re`` on every launch)."""
    header = _read_exactly(fd, 4)
    blob = _read_exactly(fd, int.from_bytes(header, "big"))
    # The manager (root) wrote it, on a socketpair that only it and we hold.
    cfg: dict[str, Any] = marshal.loads(blob)  # noqa: S302
    return cfg


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise JailError("config", "the manager closed the status socket")
        data += chunk
    return data


def launch(fd: int, argv: list[str]) -> None:
    """Jail this process by the config read from ``fd``, then exec ``argv`` (QEMU)."""
    status = fd
    try:
        cfg = read_config(fd)
        pid, start, parent = host_identity()
        _report(status, f"pid {pid} {start}")
        stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        last_cap = last_capability()
        for procs in cfg["cgroups"]:
            with open(procs, "w") as f:
                f.write("0\n")
        if cfg["mount"]:
            try:
                build_root(cfg)
            except OSError as exc:
                raise JailError("root", str(exc)) from None
        drop_privileges(cfg, last_cap, stat_fd, parent)
        status = arrange_fds(cfg["fds"], status)
        os.umask(0o077)
        if not os.access(argv[0], os.X_OK):
            raise JailError("exec", f"{argv[0]} is not executable in the jail")
        _report(status, "ok")
        os.execve(argv[0], argv, {})  # noqa: S606 (argv, no shell)
    except JailError as exc:
        _fail(status, str(exc))
    except (OSError, ValueError, KeyError) as exc:
        _fail(status, f"launch: {type(exc).__name__}: {exc}")


def _fail(status: int, message: str) -> None:
    _report(status, f"error {message}")
    sys.stderr.write(f"warden jail: {message}\n")
    sys.stderr.flush()
    os._exit(1)


# -- probe ----------------------------------------------------------------------------------


def probe(root: str, image_file: str, uid: int) -> dict[str, str | None]:
    """Try the jail's privileged steps; for each, None if it worked, else why not."""
    result: dict[str, str | None] = {}
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("mount", lambda: _mount("root", "tmpfs", root, "tmpfs", MS_NOSUID)),
        ("idmap", lambda: _probe_idmap(root, image_file, uid)),
        ("pivot_root", lambda: _probe_pivot(root)),
        ("uid", lambda: become(uid, uid)),
        ("no_new_privs", lambda: _prctl("no_new_privs", PR_SET_NO_NEW_PRIVS, 1)),
    )
    for name, step in steps:
        try:
            step()
            result[name] = None
        except (JailError, OSError) as exc:
            result[name] = str(exc)
    return result


def _probe_idmap(root: str, image_file: str, uid: int) -> None:
    userns = idmap_userns(uid, uid)
    try:
        bind_idmapped(root, image_file, userns)
    finally:
        os.close(userns)
    owner = os.stat(_jail_path(root, mirror(root, image_file))).st_uid
    if owner != uid:
        raise JailError("idmap", f"the idmapped file shows uid {owner}, not {uid}")


def _probe_pivot(root: str) -> None:
    make_devices(root, ["null"], None, None)
    enter_root(root)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "--probe":
        import json

        print(json.dumps(probe(argv[1], argv[2], int(argv[3]))))
        return 0
    if len(argv) >= 4 and argv[0] == "--fd" and argv[2] == "--":
        launch(int(argv[1]), argv[3:])
        return 1  # launch() only returns through exec or _fail
    sys.stderr.write("usage: launcher.py --fd N -- QEMU [ARG...] | --probe ROOT FILE UID\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
