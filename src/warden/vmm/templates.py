"""Templates: a VM saved once, cloned many times, its guest RAM shared copy-on-write.

A template lives in ``$WARDEN_HOME/templates/<name>/``::

    memory.ram   the guest's RAM, a sparse file (a 256 MiB guest just booted holds ~70 MB)
    state.bin    its device state without any RAM (``snapshot.save_device_state``)
    meta.json    what it was made for and the digests of both files, sealed (HMAC-SHA256
                 with the host key, ``seal/``)

and its channel secret in ``keys/template/<name>.key``.

**Making one** (:meth:`Templates.capture`). A running VM's RAM is a memfd that QEMU maps
shared (``vmm/argv.py``), or a clone's, copy-on-write over its template's. The VM is paused;
its device state is saved without any RAM (about 60 KB, ``snapshot.save_device_state``); the
host copies the RAM, the memfd it opens through ``/proc/<qemu>/fd`` or a clone's
(``memfd.copy_qemu_ram``), into ``memory.ram`` (``vmm/memfd.py``: holes stay holes);
both are hashed as they are written and sealed with the configuration. The VM is then ended
(a new template) or resumed and given a new channel secret (``--from`` a running VM).

**Cloning** (:meth:`Templates.load`). The seal and the configuration are checked first: the
image's files, QEMU's version and the machine's shape (the argv a clone gets) must be those the
template was made with, or the template is refused, never loaded. Its RAM is copied into a
memfd that is then sealed, and the digest checked on the sealed memfd itself; the kernel then
refuses every write to it, so it stays verified while clones map it ``share=off``
(copy-on-write: a clone's write goes to a private page of its own). The memfd is kept for
this process and reused by every later clone of the same sealed template. The copy runs in a
thread while the first clone's QEMU starts; that clone's state is loaded only once the copy
is sealed and checked (:attr:`LoadedTemplate.ram_ready`, docs/security.md). ``state.bin``
is checked on the open file that QEMU then loads (``-incoming fd:N``), as a paused VM's file
is.

**Boot templates.** ``_boot-<image>-<mem>m-<cpus>c-<accel>`` is the automatic template of a VM
shape under an accelerator (``tcg`` or ``kvm``: its seal binds the argv, accelerator included,
so one made under the other would be refused, and deleted): the first default create of that
shape boots cold and saves it, later ones clone it (``Machine._load_boot_template``). Its name
is no user template's (a leading '_'), ``list`` hides it unless asked, and a refused one is
deleted and made again instead of failing the create.

A clone is a new machine: the host's first session with it is authenticated by the template's
secret and hands it one of its own; its HELLO brings a fresh RNG seed, the time and its own
hostname (``guest/pid1.py:freshen``), all before any request runs.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from qemu.qmp import QMPClient

from warden._errors import (
    NameConflictError,
    SpecError,
    TemplateError,
    TemplateNotFoundError,
    TemplateRefusedError,
)
from warden.config import PRIVATE_FILE, Paths, open_private, private_dir, write_private
from warden.seal import DigestRecord, KeyStoreError, Sealer, SealRefused, sha256_fd
from warden.seal.digests import RACY_NS, stat_key
from warden.vmm import memfd, snapshot
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.snapshot import save_device_state
from warden.vmm.spec import TEMPLATE_RE, VMSpec

log = logging.getLogger(__name__)

RAM_FILE = "memory.ram"
STATE_FILE = "state.bin"
META_FILE = "meta.json"
SEAL_PURPOSE = "template/1"
NAME_RE = TEMPLATE_RE
NAME_RULE = "1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
BOOT_PREFIX = "_boot-"
MAX_AUTOMATIC = 8
"""Automatic boot templates kept per host (~110 MiB of disk each for 256 MiB): when a new
shape's is saved, the least recently used beyond this are deleted (re-made if needed)."""
BOOT_RE = re.compile(r"^_boot-[a-z0-9][a-z0-9_.-]{0,62}-[0-9]+m-[0-9]+c(-tcg|-kvm)?$")
"""An automatic boot template's name: no user template can have it (a leading '_'). One of an
older warden has no accelerator: no VM loads it any more, and it is listed and pruned."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise SpecError(f"template name {name!r} is not valid: use {NAME_RULE}")
    return name


def _stored_name(name: str) -> str:
    """``name`` if it is a user template's or an automatic one's (SpecError otherwise)."""
    return name if BOOT_RE.match(name) else check_name(name)


def boot_template_name(spec: VMSpec, *, accel: str) -> str:
    """The automatic template of ``spec``'s shape (image, memory, vCPUs) under the resolved
    accelerator ``accel`` (``tcg`` or ``kvm``): the first create of that shape boots cold and
    saves it, and later creates clone it."""
    return f"{BOOT_PREFIX}{spec.image}-{spec.memory_mib}m-{spec.vcpus}c-{accel}"


def is_automatic(name: str) -> bool:
    return BOOT_RE.match(name) is not None


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
    """The machine a template belongs to; its seal binds every field, and a clone must match
    each one."""

    image: str
    machine_key: str
    """Hash of QEMU's version and the clone's argv with per-VM names taken out."""
    qemu_version: str
    kernel_sha256: str
    initrd_sha256: str
    rootfs_sha256: str
    memory_mib: int
    vcpus: int

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TemplateInfo:
    """A template as ``warden template list`` shows it."""

    name: str
    image: str
    memory_mib: int
    vcpus: int
    created: float
    source: str | None
    disk_bytes: int
    problem: str | None
    """Why it would be refused (its seal does not verify), or None."""
    automatic: bool = False
    """The automatic boot template of a VM shape (``warden template list --all``)."""


class CaptureHold(NamedTuple):
    """What a capture of a held VM seals (``Machine.held_for_capture``): its configuration,
    and the channel secret its guest holds (a clone's first session is authenticated by it)."""

    config: TemplateConfig
    secret: bytes


@dataclasses.dataclass
class LoadedTemplate:
    """A verified template, ready for a clone: an fd of its RAM's sealed memfd and its device
    state open at offset 0, both the caller's (QEMU gets them; :meth:`close` closes ours).

    ``ram_ready`` is set when the RAM was still being copied into the memfd as it was loaded
    (the first clone of a template in a process, ``Templates.load(early=True)``): it resolves
    once the memfd is sealed and its digest checked, or raises TemplateRefusedError. QEMU may
    map the memfd meanwhile (it neither reads nor writes guest RAM before its state is
    loaded); nothing may load the clone's state before it resolves (:meth:`ram_verified`)."""

    name: str
    config: TemplateConfig
    ram_fd: int
    state: io.FileIO
    secret: bytes
    ram_ready: concurrent.futures.Future[None] | None = None

    async def ram_verified(self) -> None:
        """Return once the RAM is sealed and checked (TemplateRefusedError if refused)."""
        if self.ram_ready is not None:  # shared by every loader: shielded from our cancel
            await asyncio.shield(asyncio.wrap_future(self.ram_ready))

    def close_ram(self) -> None:
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1

    def close(self) -> None:
        self.close_ram()
        self.state.close()


@dataclasses.dataclass
class _Copying:
    """A template's RAM being copied into ``fd`` (a memfd), for ``done``."""

    fd: int
    done: concurrent.futures.Future[None]


_ram_cache: dict[tuple[str, str], int] = {}
"""(template dir, seal tag) -> sealed memfd, for this process."""
_ram_copying: dict[tuple[str, str], _Copying] = {}
"""(template dir, seal tag) -> its RAM being copied (then cached, or refused)."""
_ram_lock = threading.Lock()


class Templates:
    """The template store of ``paths``."""

    def __init__(self, paths: Paths) -> None:
        self.root = paths.home / "templates"
        self.sealer = Sealer(paths, SEAL_PURPOSE)
        self.digests = DigestRecord(paths.cache)
        self.keys = ChannelKeys(paths)

    def path(self, name: str) -> Path:
        return self.root / _stored_name(name)

    def names(self, *, automatic: bool = False) -> list[str]:
        """The user's templates (and with ``automatic``, the automatic boot templates)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (NAME_RE.match(p.name) or (automatic and BOOT_RE.match(p.name))) and p.is_dir()
        )

    def exists(self, name: str) -> bool:
        return (self.path(name) / META_FILE).is_file()

    def list(self, *, automatic: bool = False) -> list[TemplateInfo]:
        names = self.names(automatic=automatic)
        return [info for name in names if (info := self.info(name)) is not None]

    def info(self, name: str) -> TemplateInfo | None:
        """What ``list`` shows of ``name``; None if it has no ``meta.json``."""
        directory = self.path(name)
        try:
            raw = read_meta(directory / META_FILE)
        except SealRefused:
            return None
        problem: str | None = None
        try:
            meta = self.sealer.verify(raw)
        except (SealRefused, KeyStoreError) as exc:
            meta, problem = raw, str(exc)
        disk = sum(_allocated(directory / f) for f in (RAM_FILE, STATE_FILE))
        return TemplateInfo(
            name=name,
            image=str(meta.get("image", "?")),
            memory_mib=_int(meta.get("memory_mib")),
            vcpus=_int(meta.get("vcpus")),
            created=_float(meta.get("created")),
            source=_str_or_none(meta.get("source")),
            disk_bytes=disk,
            problem=problem,
            automatic=is_automatic(name),
        )

    def sealed_config(self, name: str) -> TemplateConfig:
        """Template ``name``'s configuration, its seal verified (its files are checked when
        it is loaded). TemplateNotFoundError, TemplateRefusedError."""
        path = self.path(name) / META_FILE
        if not path.is_file():
            raise TemplateNotFoundError(_not_found(name))
        try:
            return _config_of(self.sealer.verify(read_meta(path)))
        except (SealRefused, KeyStoreError) as exc:
            raise _refused(name, str(exc)) from None

    def resolve(self, spec: VMSpec) -> VMSpec:
        """``spec`` with its template's image, memory and vCPUs (a clone has its template's);
        a spec that set one of them to a value other than its default and the template's is
        refused (SpecError). A spec without a template is returned as it is."""
        if spec.template is None:
            return spec
        config = self.sealed_config(spec.template)
        fixed = {"image": config.image, "memory_mib": config.memory_mib, "vcpus": config.vcpus}
        default = VMSpec()
        for field, value in fixed.items():
            if getattr(spec, field) not in (value, getattr(default, field)):
                raise SpecError(
                    f"{field}={getattr(spec, field)!r} but template {spec.template!r} has "
                    f"{value!r}: a clone has its template's {field}; leave {field} unset"
                )
        return spec.model_copy(update=fixed)

    def remove(self, name: str) -> None:
        """Delete template ``name`` (clones running from it keep their memory)."""
        directory = self.path(name)
        if not directory.is_dir():
            raise TemplateNotFoundError(_not_found(name))
        _forget_ram(directory)
        with self._name_lock(name):
            self.keys.forget_template(name)
            shutil.rmtree(directory)

    def prune_automatic(self, keep: str, limit: int = MAX_AUTOMATIC) -> builtins.list[str]:
        """Delete the least recently used automatic boot templates beyond ``limit`` (never
        ``keep``, the one just saved): each shape of VM makes one, and disk is finite. The
        names deleted."""
        automatic = [n for n in self.names(automatic=True) if is_automatic(n) and n != keep]
        if len(automatic) < limit:
            return []

        def last_use(name: str) -> float:
            try:
                return self.path(name).stat().st_mtime
            except OSError:
                return 0.0

        pruned = sorted(automatic, key=last_use)[: len(automatic) - (limit - 1)]
        for name in pruned:
            with contextlib.suppress(TemplateNotFoundError, OSError):
                self.remove(name)
        return pruned

    # -- loading ------------------------------------------------------------------------------

    def load(self, name: str, *, early: bool = False) -> LoadedTemplate:
        """Verify template ``name`` and open it for a clone (see the module's docstring).

        TemplateNotFoundError if there is none; TemplateRefusedError if its seal or a file's
        digest does not verify. The caller still checks :attr:`LoadedTemplate.config` against
        the machine it makes (:func:`check_config`). ``early``: return before the RAM's copy
        (and its check) is done, see :attr:`LoadedTemplate.ram_ready`.
        """
        directory = self.path(name)
        if not (directory / META_FILE).is_file():
            raise TemplateNotFoundError(_not_found(name))
        try:
            raw = read_meta(directory / META_FILE)
            meta = self.sealer.verify(raw)
            config = _config_of(meta)
        except (SealRefused, KeyStoreError) as exc:
            raise _refused(name, str(exc)) from None
        secret = self.keys.template(name)
        if secret is None:
            raise _refused(name, "its channel secret is missing from the key store")
        ram_fd, ready = self._sealed_ram(directory, meta, raw["seal"]["tag"], early=early)
        try:
            state = self._open_state(directory, meta)
        except BaseException:
            os.close(ram_fd)
            raise
        with contextlib.suppress(OSError):
            os.utime(directory)  # its last use, for prune_automatic
        return LoadedTemplate(name, config, ram_fd, state, secret, ready)

    def _sealed_ram(
        self, directory: Path, meta: dict[str, Any], tag: str, *, early: bool
    ) -> tuple[int, concurrent.futures.Future[None] | None]:
        """A new fd (the caller's) of the template's RAM in a sealed memfd, copied and checked
        once per process, in a thread of its own. With ``early``, a load that finds the copy
        under way returns at once, with the future it resolves; without, it waits for it."""
        key = (str(directory), tag)
        with _ram_lock:
            cached = _ram_cache.get(key)
            if cached is not None:
                return _dup(cached), None
            copying = _ram_copying.get(key)
            if copying is None:
                copying = self._start_copy(directory, meta, key)
            fd = _dup(copying.fd)
        if early:
            return fd, copying.done
        try:
            copying.done.result()
        except BaseException:
            os.close(fd)
            raise
        return fd, None

    def _start_copy(self, directory: Path, meta: dict[str, Any], key: tuple[str, str]) -> _Copying:
        """Open ``memory.ram``, check its size, make the memfd and start the thread that fills,
        seals and checks it (hold ``_ram_lock``)."""
        src = _open_regular(directory / RAM_FILE, directory.name)
        try:
            size = os.fstat(src).st_size
            if size != meta.get("memory_size"):
                raise _refused(
                    directory.name,
                    f"{RAM_FILE} has {size} bytes, its seal says {meta.get('memory_size')}",
                )
            name = f"warden-template-{directory.name}"
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except BaseException:
            os.close(src)
            raise
        try:
            os.ftruncate(fd, size)  # its size from the start: QEMU maps it before it is filled
        except BaseException:
            os.close(fd)
            os.close(src)
            raise
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()  # no loader may cancel it for the others
        copying = _ram_copying[key] = _Copying(fd, done)
        args = (copying, key, src, size, meta)
        threading.Thread(target=self._fill, args=args, name=f"warden-copy-{name}").start()
        return copying

    def _fill(
        self, copying: _Copying, key: tuple[str, str], src: int, size: int, meta: dict[str, Any]
    ) -> None:
        """The copying thread: fill and seal the memfd, check its digest, cache it."""
        directory = Path(key[0])
        try:
            digest = self._copy_ram(directory / RAM_FILE, src, size, meta, copying.fd)
            if digest != meta.get("memory_digest"):
                raise _refused(directory.name, f"the digest of {RAM_FILE} is not the sealed one")
        except BaseException as exc:  # noqa: BLE001 - the loaders get it through the future
            with _ram_lock:
                if _ram_copying.get(key) is copying:
                    del _ram_copying[key]
            os.close(copying.fd)  # the loaders hold fds of their own
            copying.done.set_exception(exc)
            return
        finally:
            os.close(src)
        with _ram_lock:
            if _ram_copying.get(key) is copying:  # not removed meanwhile
                del _ram_copying[key]
                _drop_cached(directory)  # an older version of it (its seal changed)
                _ram_cache[key] = copying.fd
            else:
                os.close(copying.fd)
        copying.done.set_result(None)

    def _copy_ram(self, path: Path, fd: int, size: int, meta: dict[str, Any], ram: int) -> str:
        """Copy ``memory.ram`` (open at ``fd``) into the memfd ``ram`` and seal it; return its
        RAM digest. The digest is computed on the sealed memfd itself, unless the sealed one
        is remembered for the file's stat (as ``seal/digests.py`` remembers a SHA-256, and for
        the same reasons) and that stat is still the same after the copy (a change meanwhile
        would show in its ctime): then it is not hashed (0.08 s less per 110 MB of data, in
        every new process)."""
        before = stat_key(path, os.fstat(fd))
        sealed = meta.get("memory_digest")
        began = time.time_ns()
        memfd.fill_sealed(fd, ram, size)
        unchanged = stat_key(path, os.fstat(fd)) == before
        if unchanged and isinstance(sealed, str) and self.digests.lookup(before) == sealed:
            return sealed
        digest = memfd.ram_digest(ram, size)
        if unchanged and digest == sealed and began - before[-1] >= RACY_NS:
            self.digests.remember(before, digest)
        return digest

    def _open_state(self, directory: Path, meta: dict[str, Any]) -> io.FileIO:
        path = directory / STATE_FILE
        fd = _open_regular(path, directory.name)
        try:
            st = os.fstat(fd)
            if st.st_size != meta.get("state_size"):
                raise _refused(directory.name, f"{STATE_FILE} is not the size it was sealed with")
            if self.digests.digest(path, fd) != meta.get("state_sha256"):
                raise _refused(directory.name, f"the SHA-256 of {STATE_FILE} is not the sealed one")
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return io.FileIO(fd, "rb", closefd=True)

    # -- making -------------------------------------------------------------------------------

    async def capture(
        self,
        qmp: QMPClient,
        qemu_pid: int,
        name: str,
        config: TemplateConfig,
        secret: bytes,
        extra: dict[str, Any],
    ) -> None:
        """Save the paused VM behind ``qmp`` (QEMU's host pid ``qemu_pid``) as template
        ``name``, sealed for ``config``; ``secret`` is the channel secret its guest holds.

        The caller has paused the VM (QMP ``stop``) and closed its agent session; it resumes
        or ends the VM afterwards. Nothing is left behind on failure.
        """
        target = self.path(name)
        if target.exists():
            raise NameConflictError(_exists(name))
        private_dir(self.root)
        # Its own work dir: two VMs of one process may save the same boot template at once.
        work = self.root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        private_dir(work)
        try:
            record = await self._save_files(qmp, qemu_pid, work, config)
            record.update(extra, created=time.time(), name=name, **config.fields())
            write_private(work / META_FILE, _dump(self.sealer.seal(record)))
            with self._name_lock(name):  # the loser of a race touches neither key nor files
                if target.exists():
                    raise NameConflictError(_exists(name))
                self.keys.save_template(name, secret)
                try:
                    work.rename(target)
                except OSError as exc:
                    self.keys.forget_template(name)
                    raise NameConflictError(_exists(name)) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        """Hold the lock of template ``name`` (between processes: flock) while its key and
        its dir are put in place or removed."""
        fd = open_private(self.root / f".{_stored_name(name)}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def _save_files(
        self, qmp: QMPClient, qemu_pid: int, work: Path, config: TemplateConfig
    ) -> dict[str, Any]:
        """Write ``state.bin`` and ``memory.ram`` into ``work``; their sizes and digests."""
        with os.fdopen(open_private(work / STATE_FILE, os.O_RDWR | os.O_CREAT), "r+b") as f:
            await save_device_state(qmp, f.fileno(), "saving the template's device state")
            os.fsync(f.fileno())
            state_size = os.fstat(f.fileno()).st_size
            state_digest = await asyncio.to_thread(sha256_fd, f.fileno())
        size = config.memory_mib << 20
        digest = await asyncio.to_thread(_copy_ram, qemu_pid, size, work / RAM_FILE)
        return {
            "state_size": state_size,
            "state_sha256": state_digest,
            "memory_size": size,
            "memory_digest": digest,
        }


def check_config(name: str, sealed: TemplateConfig, wanted: TemplateConfig) -> None:
    """Refuse a template made for another machine than the one cloning it would make."""
    for field, value in wanted.fields().items():
        have = getattr(sealed, field)
        if have != value:
            what = {
                "kernel_sha256": "the image's kernel changed (rebuilt)",
                "initrd_sha256": "the image's initrd changed (rebuilt)",
                "rootfs_sha256": "the image's rootfs changed (rebuilt)",
                "qemu_version": f"QEMU is {value} now, it was made with {have}",
                "machine_key": "this warden gives a clone another machine (devices, command line)",
            }.get(field, f"its {field} is {have!r}, the clone's {value!r}")
            raise _refused(name, what)


def _copy_ram(qemu_pid: int, size: int, path: Path) -> str:
    """Copy the guest RAM of QEMU ``qemu_pid`` into a new sparse file at ``path``."""
    dst = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(dst, size)
        try:
            digest = memfd.copy_qemu_ram(qemu_pid, size, dst)
        except OSError as exc:
            raise TemplateError(
                f"the VM's guest RAM cannot be copied ({exc.strerror or exc}): make the "
                "template from a VM whose RAM is a memfd (memory_backend 'ram', the default)"
            ) from None
        os.fsync(dst)
    finally:
        os.close(dst)
    return digest


def _config_of(meta: dict[str, Any]) -> TemplateConfig:
    try:
        return TemplateConfig(**{f.name: meta[f.name] for f in dataclasses.fields(TemplateConfig)})
    except KeyError as exc:
        raise SealRefused(f"its {META_FILE} lacks {exc}") from None


def _open_regular(path: Path, name: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _refused(name, f"{path.name} cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refused(name, f"{path.name} is not a regular file")
    if st.st_mode & 0o077:
        os.fchmod(fd, PRIVATE_FILE)
    return fd


def _forget_ram(directory: Path) -> None:
    with _ram_lock:
        _drop_cached(directory)
        for key in [k for k in _ram_copying if k[0] == str(directory)]:
            del _ram_copying[key]  # its thread closes it instead of caching it


def _drop_cached(directory: Path) -> None:
    """Close this process's memfds of the template at ``directory`` (hold ``_ram_lock``);
    the clones that map them keep their mappings."""
    for key in [k for k in _ram_cache if k[0] == str(directory)]:
        os.close(_ram_cache.pop(key))


def _dup(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json``, read once (its seal is checked on these very bytes), if it is sealed."""
    meta = snapshot.read_meta(path)
    if not isinstance(meta.get("seal"), dict):
        raise SealRefused(f"its {META_FILE} is not a sealed JSON object")
    return meta


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, indent=1).encode()


def _allocated(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_blocks * 512
    return 0


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _not_found(name: str) -> str:
    return f"no template is named {name!r}: `warden template list` shows them"


def _exists(name: str) -> str:
    return (
        f"a template named {name!r} exists already: remove it first (`warden template rm {name}`)"
    )


def _refused(name: str, why: str) -> TemplateRefusedError:
    return TemplateRefusedError(
        f"template {name!r} is refused: {why}. Nothing was started; make it again: "
        f"`warden template rm {name}` then `warden template create {name} ...`"
    )
