"""One VM's life: launch as a sequence of steps, QMP, soft-then-hard shutdown, cleanup.

Like QEMU's own ``QEMUMachine``: the constructor only stores config, ``launch`` rolls back on
any failure, shutdown is soft then hard with cleanup in ``finally``, and every VM has its own
runtime dir. Nothing here assumes one VM per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from warden._errors import (
    AgentTimeoutError,
    ChannelAuthError,
    HostError,
    LaunchError,
    LinkError,
    NameConflictError,
    StateTransitionError,
    TemplateError,
    TemplateNotFoundError,
    TemplateRefusedError,
    VMError,
    WardenError,
)
from warden.agent.client import AgentClient
from warden.config import PRIVATE_DIR, Paths, open_private, private_dir
from warden.image.store import Image, load_image, verify_image
from warden.jail import features, ids, spawn
from warden.jail.features import JailPlan
from warden.jail.files import qemu_files
from warden.jail.policy import JailMode, default_mode
from warden.policy.admission import TCG_VM_OVERHEAD_MIB
from warden.vmm import cgroups, console, idle, ownership
from warden.vmm import pause as pausing
from warden.vmm.accel import AccelChoice, qemu_version, resolve_accel
from warden.vmm.argv import (
    XFER_SLOT_SIZE,
    XFER_SLOTS,
    BootFiles,
    PassedFd,
    RuntimeFiles,
    build_argv,
    host_tsc_khz,
)
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.fork import fork as fork_machine
from warden.vmm.idle import IdleGate
from warden.vmm.linkslots import Region, Slot, Slots
from warden.vmm.ownership import Ownership, recorded_uid
from warden.vmm.snapshot import machine_key, remove_boot_snapshots
from warden.vmm.spec import VMSpec
from warden.vmm.state import LIVE_STATES, VMState, check_transition
from warden.vmm.templates import (
    CaptureHold,
    LoadedTemplate,
    TemplateConfig,
    Templates,
    boot_template_name,
    check_config,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_TAIL_LINES = 25
QEMU_UMASK = 0o077
"""What QEMU makes (its sockets, pid file, RAM file) is for root only, like the rest."""
CONSOLE_DRAIN_S = 1.0
"""How long the console reader may take to catch up once QEMU exited (for the tail)."""

ArgvWrapper = Callable[[list[str]], list[str]]
"""A launch step that wraps QEMU's argv (inside the jail, if any: its program must be there)."""

UnhealthyCallback = Callable[["Machine", str], object]
"""Called once (on the event loop) when a running VM turns unhealthy, with the reason."""


def new_vm_id() -> str:
    return secrets.token_hex(6)


class Machine:
    """A QEMU microVM with a guest agent. Use ``await launch()`` then ``await shutdown()``."""

    forked_from: str | None = None
    """The id of the VM this one is a fork child of (its ``booted_from`` is ``template``)."""
    error: str | None = None
    """Why the VM is unhealthy (its agent connection broke), or None."""

    def __init__(
        self,
        spec: VMSpec,
        *,
        paths: Paths | None = None,
        ownership: Ownership = Ownership.EMBEDDED,
        qemu: str | None = None,
        wrappers: tuple[ArgvWrapper, ...] = (),
        vm_id: str | None = None,
        use_cgroups: bool = True,
        jail: JailMode | None = None,
        plaintext_channel: bool = False,
        auto_pause_s: float | None = None,
    ) -> None:
        self.spec = spec
        self.paths = paths or Paths.from_env()
        self.ownership = ownership
        self.qemu = qemu or shutil.which(QEMU_BINARY) or QEMU_BINARY
        self.wrappers = wrappers
        self.id = vm_id or new_vm_id()
        self.run = RuntimeFiles(self.paths.vms / self.id)
        self.state = VMState.CREATING
        self._init_launch_state()
        self._init_isolation(jail, use_cgroups)
        self._init_channel(plaintext_channel)
        # Every agent request passes the gate; with ``auto_pause_s`` it stops the VM (QMP
        # ``stop``) after that long without one, and the next request continues it.
        self.idle = IdleGate(self.id, auto_pause_s)

    def _init_launch_state(self) -> None:
        """What ``launch`` fills in: the QEMU process and its connections, how it booted."""
        self.accel: AccelChoice | None = None
        self.image: Image | None = None
        self.argv: list[str] = []
        self.started_at: float | None = None
        self._proc: asyncio.subprocess.Process | _AttachedProcess | spawn.JailedProcess | None = (
            None
        )
        self._qmp: QMPClient | None = None
        self.link_slots = Slots()  # where links' shared memory is plugged in
        self._agent: AgentClient | None = None
        self._watch: asyncio.Task[None] | None = None
        self._exit_code: int | None = None
        self.booted_from: str | None = None
        """``cold``, ``template`` (a clone: of a template, of the automatic boot template of
        its shape, or a fork child), once launched."""
        self.boot_template: str | None = None
        """The automatic boot template this VM clones, or makes once it booted cold (with
        ``boot="snapshot"``, the default); None for a cold boot or a clone of a named one."""
        self._final_console: str | None = None
        self.console_log = console.ConsoleLog(self.run.console)
        self._console_task: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        """A new agent session after the channel refused a record (see _on_agent_broken)."""
        self._renewals = 0
        self.on_unhealthy: UnhealthyCallback | None = None

    def _init_isolation(self, jail: JailMode | None, use_cgroups: bool) -> None:
        """The jail, uid and cgroups the VM's QEMU will run in (set up by ``launch``)."""
        self.use_cgroups = use_cgroups
        self.cgroup: cgroups.VMCgroup | None = None
        """The VM's cgroups (memory incl. QEMU's overhead, CPU, tasks), where the host has them."""
        self.jail_mode: JailMode = jail or default_mode()
        """off, on (what the host has; a missing feature is logged) or require."""
        self.jail: JailPlan | None = None
        """The jail this VM runs in (None: QEMU runs as root, unjailed)."""
        self.uid: int | None = None
        """The VM's own uid (and gid), claimed from warden's range, while it has one."""
        self._qemu_argv: list[str] = []
        self.qemu_reads: list[Path] = []
        """More root-only files that QEMU opens by path (a ``-fw_cfg`` file, say): bound
        read-only into its jail, where they are the VM uid's (idmapped)."""

    def _init_channel(self, plaintext_channel: bool) -> None:
        """The agent channel's keys, and the templates a clone's memory and secret come from."""
        self.plaintext_channel = plaintext_channel
        """Serve the agent channel without its crypto layer: only the benchmark does, to
        measure that layer's cost (``warden.channel=plain`` on the guest's command line)."""
        self.channel_keys = ChannelKeys(self.paths)
        self._secret: bytes | None = None
        """The channel secret the guest holds now (None: plaintext, or not launched yet)."""
        self.templates = Templates(self.paths)
        self._template: LoadedTemplate | None = None
        """The template this VM is cloned from, verified, while it launches."""

    # -- public surface ------------------------------------------------------------------

    @property
    def agent(self) -> AgentClient:
        if self.state is VMState.UNHEALTHY:
            raise VMError(
                f"VM {self.id} is unhealthy ({self.error}); its guest agent cannot be used: "
                "stop it and start a new one"
            )
        if self.state is VMState.PAUSED:
            raise StateTransitionError(pausing.paused_message(self.id))
        if self._agent is None or self.state is not VMState.RUNNING:
            raise VMError(f"VM {self.id} is {self.state.value}, not running")
        return self._agent

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The last lines of the guest console (kept after the runtime dir is gone)."""
        if self._final_console is not None:
            return "\n".join(self._final_console.splitlines()[-lines:])
        return self.console_log.tail(lines)

    def _set_state(self, new: VMState) -> None:
        """Change the state through ``vmm.state.TRANSITIONS`` (StateTransitionError if not
        allowed); setting the current state again changes nothing."""
        if new is not self.state:
            check_transition(self.id, self.state, new)
            self.state = new

    async def launch(self) -> None:
        """Start QEMU and wait for the guest agent. On any failure, roll back and raise."""
        if self.state is not VMState.CREATING:
            raise VMError(f"VM {self.id} was launched already")
        try:
            boot = await asyncio.to_thread(self._prepare)
            await self._boot(boot)
        except BaseException as exc:
            await self._rollback()
            if isinstance(exc, (asyncio.CancelledError, LaunchError, AgentTimeoutError)):
                raise
            if isinstance(exc, OSError) and self.argv:
                raise LaunchError(
                    f"launching the VM failed: {exc}", self.argv, self._exit_code, ""
                ) from exc
            raise
        self.started_at = time.time()
        self._set_state(VMState.RUNNING)
        self._watch = asyncio.create_task(self._watch_exit(), name=f"warden-vm-{self.id}")
        self._bind_idle()

    async def pause(self) -> None:
        """Save the VM's memory and devices to a sealed file and end QEMU (``vmm/pause.py``)."""
        await pausing.pause(self)

    async def resume(self) -> None:
        """Start a paused VM again from its verified saved state (``vmm/pause.py``)."""
        await pausing.resume(self)

    def _bind_idle(self) -> None:
        """Let the idle gate stop and continue this VM's QEMU (once it runs)."""
        qmp = self._qmp
        if qmp is None:
            return

        async def stop() -> None:
            await qmp.execute("stop")

        async def cont() -> None:
            await qmp.execute("cont")
            if self._agent is not None:
                self._agent.send_time()  # the guest's clock stood still

        self.idle.bind(stop, cont)

    async def shutdown(self, *, timeout: float = 3.0) -> None:
        """Stop the VM: QMP ``quit`` first, SIGKILL after ``timeout``; always clean up."""
        if self.state in (VMState.STOPPED, VMState.FAILED) and self._proc is None:
            return
        self._begin_stop()
        try:
            if self._agent is not None:
                await self._agent.close()
            if self._proc is not None and self._proc.returncode is None and self._qmp:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.execute("quit"), timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout)
        finally:
            await self._hard_stop()
            self._end_stop()

    async def kill(self) -> None:
        """Stop the VM at once (SIGKILL) and clean up."""
        self._begin_stop()
        try:
            await self._hard_stop()
        finally:
            self._end_stop()

    def _begin_stop(self) -> None:
        if self.state in LIVE_STATES or self.state is VMState.PAUSED:
            self._set_state(VMState.STOPPING)

    def _end_stop(self) -> None:
        if self.state is VMState.STOPPING:
            self._set_state(VMState.STOPPED)
        elif self.state is VMState.CREATING:  # stopped before its launch finished
            self._set_state(VMState.FAILED)

    async def wait(self) -> int:
        """Wait for QEMU to exit; return its exit code."""
        if self._proc is None:
            raise VMError(f"VM {self.id} has no QEMU process")
        return await self._proc.wait()

    @classmethod
    async def attach(
        cls,
        spec: VMSpec,
        *,
        vm_id: str,
        pid: int,
        pid_start: int | None,
        paths: Paths | None = None,
        ownership: Ownership = Ownership.DAEMON,
        started_at: float | None = None,
        timeout: float = 10.0,
    ) -> Machine:
        """Take over a QEMU that is already running (started by an earlier manager).

        Connects QMP and the guest agent through the VM's runtime dir, sets the state to
        running and watches the process (a non-child: by polling its pid and start time).
        Raises VMError if the process is gone or does not answer within ``timeout``; the
        caller then releases the runtime dir (``ownership.release``).
        """
        machine = cls(spec, paths=paths, ownership=ownership, vm_id=vm_id)
        proc = _AttachedProcess.open(pid, pid_start, machine.run.dir)
        if proc is None:
            raise VMError(f"VM {vm_id}: its QEMU (pid {pid}) is not running any more")
        machine._proc = proc
        machine.uid = recorded_uid(machine.run.dir)
        group = cgroups.VMCgroup(vm_id)
        if group.path("memory").is_dir():
            machine.cgroup = group  # made by the manager that launched it; removed at the end
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await machine._start_console(deadline)
                machine._qmp = await machine._connect_qmp(deadline)
                await idle.continue_if_stopped(machine._qmp)  # an earlier manager's idle stop
                await machine.link_slots.adopt(machine._qmp, pid)  # links died with it
                # The earlier manager may have died mid-frame: resynchronise the stream.
                machine._secret = await asyncio.to_thread(machine.channel_keys.current, vm_id)
                machine._agent = await machine._reattach_agent(
                    max(0.1, deadline - time.monotonic())
                )
        except BaseException as exc:
            await machine._detach_connections()
            proc.close()
            machine._proc = None
            machine._set_state(VMState.FAILED)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise VMError(
                f"VM {vm_id}: could not reattach to its QEMU (pid {pid}): "
                f"{exc or type(exc).__name__}"
            ) from exc
        machine.started_at = started_at or time.time()
        machine._set_state(VMState.RUNNING)
        machine._watch = asyncio.create_task(machine._watch_exit(), name=f"warden-vm-{vm_id}")
        machine._bind_idle()
        return machine

    async def detach(self) -> None:
        """Drop the connections to this VM and stop watching it; QEMU keeps running.

        For a manager that exits and leaves its VMs to the next one (``Ownership.DAEMON``).
        """
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        await self._detach_connections()

    async def _detach_connections(self) -> None:
        await self._stop_console()
        await self._close_connections()

    async def _close_connections(self) -> None:
        """Close the agent session and QMP (errors ignored: QEMU may be gone already)."""
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None

    # -- launch steps ----------------------------------------------------------------------

    def _prepare(self) -> BootFiles:
        """Resolve and verify the image, choose the accelerator, make the runtime dir."""
        if shutil.which(self.qemu) is None:
            raise HostError(
                f"QEMU ({self.qemu}) is not installed; run `apt-get install qemu-system-x86` "
                "or `make setup`"
            )
        ownership.sweep_stale(self.paths.vms)
        if self.spec.template is not None:
            self._load_template(self.spec.template)
        self.image = load_image(self.paths, self.spec.image)
        verify_image(self.image)
        boot = BootFiles(self.image.kernel.path, self.image.initrd.path, self.image.rootfs.path)
        self.accel = resolve_accel(
            self.spec.accel, self.paths, boot, self.image.kernel.sha256, self.qemu
        )
        if self._template is not None:
            check_config(self._template.name, self._template.config, self._template_config(boot))
        elif self._wants_boot_template():
            self._template = self._load_boot_template(boot)
        self.jail = self._plan_jail(boot)  # before anything is made: a refusal leaves nothing
        private_dir(self.run.dir.parent.parent)  # run/
        private_dir(self.run.dir.parent)  # run/vms/: its names are VM ids
        self.run.dir.mkdir(mode=PRIVATE_DIR)
        ownership.claim(self.run.dir, self.ownership)
        if self.jail is not None and self.jail.uid:
            self.uid = ids.claim(self.run.dir.parent, self.id)
            ownership.record_uid(self.run.dir, self.uid)
        fd = open_private(self.run.xfer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.truncate(XFER_SLOTS * XFER_SLOT_SIZE)  # sparse: costs nothing until used
        if not self.plaintext_channel:
            self._write_secret()
        if self.jail is not None and self.spec.memory_backend == "file":
            os.close(open_private(self.run.memory, os.O_WRONLY | os.O_CREAT))  # bound into it
        self._make_cgroups()
        return boot

    def _load_template(self, name: str) -> None:
        """Verify template ``name`` and take its image, memory and vCPUs (a spec that set
        them otherwise is refused)."""
        self.spec = self.templates.resolve(self.spec)
        self._template = self.templates.load(name, early=True)

    def _wants_boot_template(self) -> bool:
        """Whether this VM starts from (or makes) the automatic template of its shape: with
        ``boot="snapshot"``, RAM a memfd it can copy, and a channel secret to re-key."""
        return (
            self.spec.boot == "snapshot"
            and self.spec.memory_backend == "ram"
            and not self.plaintext_channel
        )

    def _load_boot_template(self, boot: BootFiles) -> LoadedTemplate | None:
        """The verified automatic template of this VM's shape, to clone; None if there is
        none yet or it was refused (its seal, a file, the image or QEMU no longer match): the
        refused one is deleted, and either way the VM boots cold and makes it again."""
        assert self.accel is not None
        name = self.boot_template = boot_template_name(self.spec, accel=self.accel.name)
        loaded: LoadedTemplate | None = None
        try:
            loaded = self.templates.load(name, early=True)
            check_config(name, loaded.config, self._template_config(boot))
            return loaded
        except TemplateNotFoundError:
            return None
        except TemplateRefusedError as exc:
            if loaded is not None:
                loaded.close()
            log.warning("VM %s: %s; booting cold and making it again", self.id, exc)
            self._discard_boot_template(name)
            return None

    def _discard_boot_template(self, name: str) -> None:
        with contextlib.suppress(TemplateNotFoundError, OSError):
            self.templates.remove(name)

    def _template_config(self, boot: BootFiles) -> TemplateConfig:
        """The machine a template of this VM, or a clone made like it, is (sealed for): the
        argv without per-VM names, jail fds or seccomp, which the guest never sees."""
        assert self.image is not None and self.accel is not None
        version = qemu_version(self.qemu, self.paths.cache)
        shape = build_argv(
            self.spec, boot, self.run, accel=self.accel.name, qemu=QEMU_BINARY,
            tsc_khz=tsc_khz(), console_socket=True, link_slots=len(self.link_slots.slots),
        )  # fmt: skip
        return TemplateConfig(
            image=self.spec.image,
            machine_key=machine_key(shape, self.id, self.run.dir, version),
            qemu_version=version,
            kernel_sha256=self.image.kernel.sha256,
            initrd_sha256=self.image.initrd.sha256,
            rootfs_sha256=self.image.rootfs.sha256,
            memory_mib=self.spec.memory_mib,
            vcpus=self.spec.vcpus,
        )

    def _write_secret(self) -> None:
        """Make the VM's channel secret and the 0600 file QEMU hands to the guest (fw_cfg)."""
        self._secret = self.channel_keys.create(self.id)
        fd = open_private(self.run.channel_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(self._secret)
        self.qemu_reads.append(self.run.channel_key)

    def _drop_secret_file(self) -> None:
        """The guest has its secret (its agent answered a handshake): QEMU read the file when
        it started, so it goes."""
        self.run.channel_key.unlink(missing_ok=True)

    def _plan_jail(self, boot: BootFiles) -> JailPlan | None:
        """The jail this VM gets (None: none at all). ``require`` refuses a partial one; ``on``
        logs what is missing."""
        if self.jail_mode == "off":
            return None
        host = features.detect(self.paths, self.qemu, boot.kernel, use_cgroups=self.use_cgroups)
        plan = JailPlan.from_features(host)
        if self.jail_mode == "require":
            plan.refuse_if_incomplete()
        elif plan.missing:
            log.warning(
                "VM %s runs in a partial jail, without %s", self.id, plan.describe_missing()
            )
        if plan.enabled:
            private_dir(self.paths.run / "jail")  # where each jail mounts its root
            return plan
        return None

    def _make_cgroups(self) -> None:
        if self.use_cgroups and cgroups.available() is None:
            # QEMU's own overhead is charged as admission control charges it.
            limits = cgroups.Limits.for_vm(
                self.spec.memory_mib, self.spec.vcpus, TCG_VM_OVERHEAD_MIB
            )
            group = cgroups.VMCgroup(self.id)
            try:
                group.create(limits)
                self.cgroup = group
            except OSError as exc:
                log.warning("VM %s runs without cgroup limits: %s", self.id, exc)

    def _set_argv(self, boot: BootFiles, clone_ram: str | None = None) -> list[str]:
        """Build QEMU's argv (``self.argv``: with the wrappers and the owner's prefix); return
        the bare one."""
        assert self.accel is not None
        qemu_argv = build_argv(
            self.spec,
            boot,
            self.run,
            accel=self.accel.name,
            qemu=self.qemu,
            tsc_khz=tsc_khz(),
            console_socket=True,
            passed_fds=self.jail is not None,
            sandbox=self.jail is not None and self.jail.seccomp,
            plaintext=self.plaintext_channel,
            clone_ram=clone_ram,
            link_slots=len(self.link_slots.slots),
        )
        argv = qemu_argv
        for wrap in self.wrappers:
            argv = wrap(argv)
        self._qemu_argv = argv
        self.argv = ownership.spawn_prefix(self.ownership) + argv
        return qemu_argv

    async def _boot_clone(self, boot: BootFiles, template: LoadedTemplate) -> None:
        """Start QEMU on the template's RAM (copy-on-write) and device state; the first
        session, authenticated by the template's secret, hands the clone its own. QEMU starts
        while the RAM may still be being copied: its state is loaded only once the copy is
        sealed and checked (``LoadedTemplate.ram_ready``; docs/security.md)."""
        self._template = None  # its state file is QEMU's (and closed) from here on
        jailed = self.jail is not None
        ram = f"/proc/self/fd/{PassedFd.TEMPLATE_RAM if jailed else template.ram_fd}"
        state = PassedFd.INCOMING if jailed else template.state.fileno()
        try:
            self._set_argv(boot, clone_ram=ram)
            await self._spawn(restore=template.state, template_ram=template.ram_fd)
        finally:
            template.close_ram()  # QEMU holds its own
        incoming = f"fd:{state}"
        await self._connect(restored=True, held=template.secret, incoming=incoming, ram=template)
        self.booted_from = "template"

    async def _boot(self, boot: BootFiles) -> None:
        """Clone the template (named, or the automatic one of this shape), else boot cold and,
        with ``boot="snapshot"``, save the automatic template of this shape."""
        if self._template is not None:
            try:
                await self._boot_clone(boot, self._template)
                return
            except (LaunchError, TemplateRefusedError) as exc:
                if self.boot_template is None:
                    raise
                log.warning(
                    "VM %s: boot template %s did not start (%s); booting cold and making it again",
                    self.id,
                    self.boot_template,
                    exc.reason if isinstance(exc, LaunchError) else exc,
                )
                self._discard_boot_template(self.boot_template)
                await self._stop_process()
        self._set_argv(boot)
        await self._spawn()
        await self._connect()
        self.booted_from = "cold"
        if self.boot_template is not None:
            await self._save_boot_template(boot, self.boot_template)

    async def _spawn(
        self, *, restore: io.FileIO | None = None, template_ram: int | None = None
    ) -> None:
        """Start QEMU; ``restore``, a verified saved state open at offset 0 (a paused VM's, or
        a template's device state), is loaded from its fd (and closed here); ``template_ram``
        is a clone's template RAM (a sealed memfd)."""
        if self.jail is not None:
            await self._spawn_jailed(self.jail, restore, template_ram)
            return
        argv = list(self.argv)
        pass_fds: tuple[int, ...] = () if template_ram is None else (template_ram,)
        state = restore
        try:
            if state is not None:
                pass_fds += (state.fileno(),)
                # A clone's migration starts once its template's RAM is checked (_connect).
                argv += ["-incoming", "defer" if template_ram else f"fd:{state.fileno()}"]
            log_fd = open_private(self.run.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(log_fd, "wb") as qemu_log:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=ownership.new_session(self.ownership),
                    pass_fds=pass_fds,
                    umask=QEMU_UMASK,
                )
        finally:
            if state is not None:
                state.close()
        ownership.record_qemu(self.run.dir, self._proc.pid)
        if self.cgroup is not None:
            try:
                self.cgroup.attach(self._proc.pid)
            except OSError as exc:
                log.warning("VM %s runs without cgroup limits: %s", self.id, exc)

    async def _spawn_jailed(
        self, plan: JailPlan, restore: io.FileIO | None, template_ram: int | None
    ) -> None:
        """Start QEMU through the jail (``jail/spawn.py``): it gets its sockets and files as
        fds, joins its cgroups, and is tracked by the host pid the launcher reports."""
        try:
            await self._start_jailed(plan, restore, template_ram)
        finally:
            if restore is not None:
                restore.close()

    async def _start_jailed(
        self, plan: JailPlan, restore: io.FileIO | None, template_ram: int | None
    ) -> None:
        argv = list(self._qemu_argv)
        if restore is not None:
            deferred = template_ram is not None  # started once the template's RAM is checked
            argv += ["-incoming", "defer" if deferred else f"fd:{PassedFd.INCOMING}"]
        prefix = ownership.spawn_prefix(self.ownership)
        prefix += spawn.namespace_prefix(plan, shutil.which("unshare") or "unshare")
        config = self._jail_config(plan)
        # A clone opens its template's RAM, and a link's region is opened, as /proc/self/fd/N.
        config.proc = True
        log_fd = open_private(self.run.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        restore_fd = restore.fileno() if restore is not None else None
        passing = spawn.passed_fds(self.run, restore_fd, template_ram)
        with os.fdopen(log_fd, "wb") as qemu_log, passing as fds:
            proc = await spawn.start(
                argv,
                config,
                fds,
                prefix=prefix,
                log_fd=qemu_log.fileno(),
                new_session=ownership.new_session(self.ownership),
            )
            self._proc = proc
            self.argv = proc.argv
            await proc.ready(self.argv, on_pid=self._record_qemu)

    def _record_qemu(self, pid: int, start: int) -> None:
        ownership.record_qemu(self.run.dir, pid, start)

    def _jail_config(self, plan: JailPlan) -> spawn.JailConfig:
        assert self.image is not None and self.accel is not None
        image_files = [
            str(a.path) for a in (self.image.kernel, self.image.initrd, self.image.rootfs)
        ]
        image_files += [str(p) for p in self.qemu_reads]
        file_ram = self.spec.memory_backend == "file"
        # QEMU sizes its RAM memfd with ftruncate, which RLIMIT_FSIZE bounds too.
        fsize = spawn.fsize_limit(
            self.spec.memory_mib, XFER_SLOTS * XFER_SLOT_SIZE, writes_ram=True
        )
        return spawn.JailConfig(
            root=self.paths.run / "jail",
            ro_files=list(qemu_files(self.qemu, self.accel.name, self.paths.cache))
            if plan.mount
            else [],
            id_files=image_files if plan.mount else [],
            rw_files=[str(self.run.xfer), *([str(self.run.memory)] if file_ram else [])]
            if plan.mount
            else [],
            devices=spawn.devices(self.accel.name),
            uid=self.uid,
            cgroups=[str(self.cgroup.path(c) / "cgroup.procs") for c in cgroups.CONTROLLERS]
            if self.cgroup is not None
            else [],
            rlimits=spawn.rlimits(fsize),
            mount=plan.mount,
            nnp=plan.nnp,
            # QEMU dies with the unshare that waits for it; without a PID namespace its parent
            # is the owner, which a daemon's VMs must outlive.
            pdeathsig=plan.pid or self.ownership is Ownership.EMBEDDED,
        )

    async def _save_boot_template(self, boot: BootFiles, name: str) -> None:
        """Save this just-booted VM, before any request reached it, as the automatic template
        ``name`` of its shape, then resume it with a new channel secret (the template holds
        its old one). Best effort: a failure is logged and the VM goes on; when two VMs race,
        the first one saved wins."""
        if self.templates.exists(name):
            return
        try:
            assert self._secret is not None  # only a VM with a channel makes one
            hold = CaptureHold(self._template_config(boot), self._secret)
            extra = {"automatic": True}
            await self.capture(self.templates, name, hold, extra, keep_running=True)
            await asyncio.to_thread(remove_boot_snapshots, self.paths.home)
            await asyncio.to_thread(self.templates.prune_automatic, name)
        except NameConflictError:
            return  # another VM of this shape saved it first
        except (TemplateError, OSError, QMPError) as exc:
            log.warning("VM %s: could not save boot template %s: %s", self.id, name, exc)

    async def save_template(
        self,
        name: str,
        *,
        keep_running: bool,
        extra: dict[str, Any] | None = None,
        store: Templates | None = None,
    ) -> None:
        """Save this running VM as template ``name`` (``vmm/templates.py``).

        The VM is paused meanwhile and its agent session closed; StateTransitionError while
        requests are in flight (the idle gate holds new ones off meanwhile).
        With ``keep_running`` it then resumes with a new channel secret (the template holds
        the old one); else the caller ends it. NameConflictError if the name is taken,
        TemplateError if this VM's RAM cannot be copied. ``store``: another template store
        than ``self.templates`` (a fork's transient one).
        """
        store = store or self.templates
        async with self.held_for_capture(name, store) as hold:
            await self.capture(store, name, hold, extra or {}, keep_running=keep_running)
        if keep_running:
            self.idle.reopen()

    @contextlib.asynccontextmanager
    async def held_for_capture(self, name: str, store: Templates) -> AsyncIterator[CaptureHold]:
        """Check that this running VM can be saved as ``name`` in ``store``, and hold it for
        :meth:`capture`: no request in flight, new ones refused until :meth:`IdleGate.reopen`
        (a VM kept running) or its end. Yields what the capture seals: its configuration and
        the channel secret its guest holds. Errors as :meth:`save_template`'s; on one, the
        gate opens again."""
        if self.state is not VMState.RUNNING or self._qmp is None or self.image is None:
            raise VMError(f"VM {self.id} is {self.state.value}, not running")
        if self._secret is None:
            raise TemplateError(f"VM {self.id} has a plaintext channel: it cannot be a template")
        if store.exists(name):
            raise NameConflictError(
                f"a template named {name!r} exists already: remove it first "
                f"(`warden template rm {name}`)"
            )
        boot = BootFiles(self.image.kernel.path, self.image.initrd.path, self.image.rootfs.path)
        config = self._template_config(boot)
        self.link_slots.check_none(self.id, "save it")
        # The idle gate holds off auto-pause and new requests meanwhile (it refuses while
        # requests are in flight), and continues a VM that auto-pause had stopped.
        await self.idle.wake()
        async with self.idle.exclusive(f"VM {self.id} is being saved", what="save it"):
            yield CaptureHold(config, self._secret)

    async def capture(
        self,
        store: Templates,
        name: str,
        hold: CaptureHold,
        extra: dict[str, Any],
        *,
        keep_running: bool,
    ) -> None:
        """Stop the VM held by :meth:`held_for_capture` and save it into ``store`` as ``name``;
        with ``keep_running``, continue it and give it a new channel secret (the capture holds
        the old one)."""
        assert self._qmp is not None and self._secret == hold.secret
        if self._agent is not None:
            await self._agent.close()  # the template must hold no host session
            self._agent = None
        await self._qmp.execute("stop")
        try:
            await store.capture(self._qmp, self._qemu_pid(), name, hold.config, hold.secret, extra)
        finally:
            if keep_running:
                await self._qmp.execute("cont")
                # The template holds this VM's secret now: it gets a new one of its own.
                self._agent = await self._open_agent(self.spec.agent_timeout_s, held=self._secret)

    async def plug_link(self, name: str, region: Region) -> Slot:
        """Plug link ``name``'s shared-memory region into a free link slot of this running VM
        (``vmm/linkslots.py``); LinkError past the slot limit or if QEMU refuses (nothing is
        left plugged)."""
        if self._qmp is None or self.state is not VMState.RUNNING:
            raise LinkError(f"VM {self.id} is {self.state.value}, not running")
        slot = self.link_slots.reserve(name, self.id)
        try:
            await self.link_slots.plug(self._qmp, slot, region)
        except (QMPError, TimeoutError) as exc:
            slot.link = None
            why = str(exc) or "no answer in time"
            raise LinkError(f"QEMU of VM {self.id} could not take link {name!r}: {why}") from exc
        except BaseException:
            slot.link = None
            raise
        return slot

    async def unplug_link(self, slot: Slot) -> bool:
        """Unplug a link's region (after it was revoked); whether the guest released it."""
        return await self.link_slots.unplug(self._qmp, slot)

    async def fork(self, n: int = 1, *, vm_ids: list[str] | None = None) -> list[Machine]:
        """Start ``n`` children of this running VM that carry on from its state (files and
        processes included) and share its memory copy-on-write (``vmm/fork.py``); this VM
        keeps running, with a new channel secret. The caller owns the children.

        SpecError for a bad ``n``; TemplateError if this VM's RAM is a file. A clone forks too
        (its device state then carries its private RAM: slower). A fork that fails leaves
        nothing behind.
        """
        return await fork_machine(self, n, vm_ids)

    def _qemu_pid(self) -> int:
        """QEMU's host pid (a jailed one's, not its ``unshare``'s)."""
        if self._proc is None or self._proc.returncode is not None:
            raise VMError(f"VM {self.id}: its QEMU is not running")
        return self._proc.pid

    def _on_agent_broken(self, error: WardenError) -> None:
        """The agent connection broke: a protocol violation, an unresponsive agent, or lost.

        A running VM turns unhealthy (the reason in ``error``); it can still be stopped.
        """
        if self.state is not VMState.RUNNING:
            log.warning("VM %s (%s): %s", self.id, self.state.value, error)
            return  # launching (the launch fails by itself), stopping, or gone already
        if isinstance(error, ChannelAuthError) and self._renewals < MAX_SESSION_RENEWALS:
            # Something altered the traffic on the way (the agent itself cannot: it holds the
            # keys). The requests in flight failed; a new session serves the next ones.
            self._renewals += 1
            log.warning("VM %s: %s; opening a new agent session", self.id, error)
            self._renewal = asyncio.create_task(
                self._renew_session(), name=f"warden-renew-{self.id}"
            )
            return
        self._mark_unhealthy(error)

    async def _renew_session(self) -> None:
        try:
            self._agent = await self._open_agent(self.spec.agent_timeout_s, resync=True)
        except WardenError as exc:
            if self.state is VMState.RUNNING:
                self._mark_unhealthy(exc)
        finally:
            self._renewal = None

    def _mark_unhealthy(self, error: WardenError) -> None:
        self.error = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._set_state(VMState.UNHEALTHY)
        log.warning("VM %s is unhealthy: %s", self.id, self.error)
        if self.on_unhealthy is not None:
            self.on_unhealthy(self, self.error)

    async def _open_agent(
        self,
        timeout: float,
        *,
        resync: bool = False,
        held: bytes | None = None,
        new: bytes | None = None,
    ) -> AgentClient:
        """Connect to the agent (through the encrypted channel, unless plaintext).

        ``held``: the secret the guest holds when it is not the VM's own (a clone's template's;
        this VM's own when a template, fork or pause file of it was just taken; the one
        before an unfinished re-key): that session hands the guest ``new`` (a fresh one if None),
        stored first (``vmm/channel_keys.py``)."""
        secret, rekey = self._secret, None
        if held is not None:
            rekey = await asyncio.to_thread(self.channel_keys.begin_rekey, self.id, held, new)
            secret = held
        agent = await AgentClient.connect_unix(
            self.run.agent,
            timeout=timeout,
            resync=resync,
            name=self.id,
            on_broken=self._on_agent_broken,
            secret=secret,
            rekey=rekey,
        )
        if rekey is not None:
            self._secret = rekey
            await asyncio.to_thread(self.channel_keys.end_rekey, self.id)
        self._drop_secret_file()
        agent.gate = self.idle
        agent.enable_xfer(self.run.xfer, slots=XFER_SLOTS, slot_size=XFER_SLOT_SIZE)
        return agent

    async def _reattach_agent(self, timeout: float) -> AgentClient:
        """Connect to the agent of a VM an earlier manager ran, with the secret it kept (or
        the one before, if that manager died in the middle of a re-key)."""
        if self._secret is None:
            raise VMError(
                f"no channel secret is kept for VM {self.id} (it was started by an older "
                "warden, or its key file was removed): remove it with `warden rm`"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            return await self._open_agent(timeout, resync=True)
        except ChannelAuthError:
            held = await asyncio.to_thread(self.channel_keys.previous, self.id)
            if held is None:
                raise
            remaining = max(0.1, deadline - loop.time())
            return await self._open_agent(remaining, resync=True, held=held, new=self._secret)

    async def _connect(
        self,
        *,
        restored: bool = False,
        held: bytes | None = None,
        incoming: str | None = None,
        ram: LoadedTemplate | None = None,
    ) -> None:
        """Connect QMP and the agent, racing both against QEMU's exit and the deadline.

        A restored VM (a clone, a resumed one) is continued once its state has loaded: the
        state was saved paused. Its guest holds the saved channel secret, ``held``, until the
        first session hands it this VM's own. ``incoming``: a clone's deferred migration (its
        template's device state, RAM left out), started here once ``ram``, its template, has
        its RAM sealed and checked (TemplateRefusedError if it was refused).
        """
        assert self._proc is not None
        deadline = time.monotonic() + self.spec.agent_timeout_s
        exited = asyncio.create_task(self._proc.wait())
        try:
            await self._race(self._start_console(deadline), exited, deadline, "the console")
            self._qmp = await self._race(self._connect_qmp(deadline), exited, deadline, "QMP")
            if ram is not None:
                await ram.ram_verified()
            if incoming is not None:
                loading = _load_device_state(self._qmp, incoming)
                await self._race(loading, exited, deadline, "the template's state")
            if restored:
                await self._race(self._resume_restored(self._qmp), exited, deadline, "restore")
            opening = self._open_agent(deadline - time.monotonic(), held=held, new=self._secret)
            self._agent = await self._race(opening, exited, deadline, "the guest agent")
        finally:
            if not exited.done():
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited

    async def _race(
        self,
        step: Coroutine[Any, Any, _T],
        exited: asyncio.Task[int],
        deadline: float,
        what: str,
    ) -> _T:
        task = asyncio.ensure_future(step)
        remaining = max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(
            {task, exited}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done and not task.cancelled() and task.exception() is None:
            return task.result()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if exited in done:
            self._exit_code = exited.result()
            await self._stop_console(drain=True)
            raise LaunchError(
                f"QEMU exited while waiting for {what}" + self._qemu_log_hint(),
                self.argv,
                self._exit_code,
                self.console_tail(),
            )
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, AgentTimeoutError):
                raise AgentTimeoutError(self._timeout_message(what)) from exc
            raise LaunchError(
                f"connecting to {what} failed: {exc}", self.argv, None, self.console_tail()
            ) from exc
        raise AgentTimeoutError(self._timeout_message(what))

    def _timeout_message(self, what: str) -> str:
        return (
            f"{what} of VM {self.id} did not answer within {self.spec.agent_timeout_s:.0f} s "
            f"(accel {self.accel.name if self.accel else '?'}); raise agent_timeout_s if the "
            f"host is loaded.\n  console tail:\n{self.console_tail() or '(empty)'}"
        )

    def _qemu_log_hint(self) -> str:
        text = _tail(self.run.qemu_log, 5)
        return f": {text}" if text else ""

    @staticmethod
    async def _resume_restored(qmp: QMPClient) -> None:
        while True:
            status = await qmp.execute("query-status")
            if isinstance(status, dict) and status.get("status") != "inmigrate":
                break
            await asyncio.sleep(0.005)
        await qmp.execute("cont")

    async def _start_console(self, deadline: float) -> None:
        """Connect to QEMU's console socket and copy it into the capped console log."""
        stream = await console.connect(self.run.console_sock, deadline)
        self._console_task = asyncio.create_task(
            console.pump(stream, self.console_log), name=f"warden-console-{self.id}"
        )

    async def _stop_console(self, *, drain: bool = False) -> None:
        """Stop the console reader; with ``drain`` (QEMU has exited), let it read to the end."""
        task, self._console_task = self._console_task, None
        if task is None:
            return
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), CONSOLE_DRAIN_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _connect_qmp(self, deadline: float) -> QMPClient:
        qmp = QMPClient(f"warden-{self.id}")
        while not self.run.qmp.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        while True:
            try:
                await qmp.connect(str(self.run.qmp))
                return qmp
            except Exception:  # the socket appears once QEMU is up; retry until the deadline
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    # -- stop and cleanup ------------------------------------------------------------------

    async def _watch_exit(self) -> None:
        """Notice QEMU dying on its own: mark the VM failed and release its resources."""
        assert self._proc is not None
        code = await self._proc.wait()
        if self.state in LIVE_STATES:
            self._exit_code = code
            self._set_state(VMState.FAILED)
            log.warning("VM %s: QEMU exited unexpectedly with code %s", self.id, code)
            await self._cleanup()

    async def _hard_stop(self) -> None:
        await self._stop_process()
        await self._cleanup()

    async def _stop_process(self) -> None:
        """SIGKILL QEMU and drop its connections, keeping the runtime dir (for a retry)."""
        await self._close_connections()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        if self._proc is not None:
            self._exit_code = await self._proc.wait()
        await self._stop_console(drain=True)

    async def _rollback(self) -> None:
        self._set_state(VMState.FAILED)
        if self._template is not None:  # refused before QEMU took its state file
            self._template.close()
            self._template = None
        await self._hard_stop()

    async def _cleanup(self) -> None:
        if self._renewal is not None and self._renewal is not asyncio.current_task():
            self._renewal.cancel()
        self.idle.unbind()
        self.idle.frozen = f"VM {self.id} is {self.state.value}"
        await self._stop_process()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.run.dir.exists():
            self._final_console = self.console_log.tail(CONSOLE_TAIL_LINES)
            await asyncio.to_thread(shutil.rmtree, self.run.dir, True)
        if self.uid is not None and (self._proc is None or self._proc.returncode is not None):
            ids.release(self.paths.vms, self.uid, self.id)  # QEMU is gone: no one runs as it
            self.uid = None
        if self._proc is None or self._proc.returncode is not None:
            await asyncio.to_thread(self.channel_keys.forget, self.id)
            await asyncio.to_thread(pausing.PausedStates(self.paths).discard, self.id)


async def _load_device_state(qmp: QMPClient, uri: str) -> None:
    """Start a deferred incoming migration of device state only: RAM is the template's. The
    state holds no RAM section (``snapshot.save_device_state``) and no configuration section
    (``migration.send-configuration=off``), so no migration capability needs to be set."""
    await qmp.execute("migrate-incoming", {"uri": uri})


MAX_SESSION_RENEWALS = 3
"""New agent sessions a VM gets after the channel refused a record; the next refusal makes it
unhealthy (a path that keeps altering traffic is not worth talking through)."""

ATTACHED_POLL_S = 0.25
"""How often the exit of an attached (non-child) QEMU is polled."""

UNKNOWN_EXIT_CODE = -1
"""The exit code recorded for an attached QEMU: a non-child's real code cannot be known."""


class _AttachedProcess:
    """A QEMU process that is not our child (started by an earlier manager).

    Quacks like ``asyncio.subprocess.Process`` for what Machine uses: ``pid``, ``returncode``,
    ``wait()`` (polls ``ownership.is_alive``) and ``send_signal()``, through a pidfd opened
    and checked once (:func:`ownership.open_verified`: the recorded start time, and a command
    line naming the runtime dir), so a recycled pid is never signalled.
    """

    def __init__(self, pid: int, start_time: int | None, pidfd: int | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self._pidfd = pidfd
        self._returncode: int | None = None

    @classmethod
    def open(cls, pid: int, start_time: int | None, rundir: Path) -> _AttachedProcess | None:
        """The running QEMU of ``rundir`` with that pid and start time, or None."""
        fd = ownership.open_verified(pid, start_time, rundir)
        return None if fd is None else cls(pid, start_time, fd)

    @property
    def returncode(self) -> int | None:
        if self._returncode is None and not ownership.is_alive(self.pid, self.start_time):
            self._returncode = UNKNOWN_EXIT_CODE
            self.close()
        return self._returncode

    async def wait(self) -> int:
        while True:
            code = self.returncode
            if code is not None:
                return code
            await asyncio.sleep(ATTACHED_POLL_S)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)
        else:
            os.kill(self.pid, sig)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


@functools.cache
def tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            return host_tsc_khz(f.read())
    except OSError:
        return None


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])
