"""The manager: owns every VM of the host, keeps their state in the store, outlives its clients.

One :class:`Manager` per host (``warden serve`` holds a lock file so). Its VMs run with
``Ownership.DAEMON``: they keep running when the manager exits or is killed, and the next
manager reattaches to them (:meth:`Manager.start`)::

    manager = Manager(paths)
    await manager.start()          # reattach to live VMs, mark dead ones failed
    vm = await manager.create(spec)
    await manager.close()          # leaves the VMs running

Every store call runs off the event loop (``asyncio.to_thread``), as ``store/db.py`` asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from warden._errors import (
    NameConflictError,
    SpecError,
    StateTransitionError,
    VMError,
    VMNotFoundError,
    WardenError,
)
from warden.audit import AuditLog
from warden.config import Paths
from warden.image.store import load_image
from warden.jail import features
from warden.jail.policy import default_mode
from warden.links import LinkManager
from warden.policy import footprint
from warden.policy.admission import AdmissionPolicy, Charges, HostCapacity, VMUsage, check_usage
from warden.policy.meter import UsageMeter
from warden.server.audit import Auditor, audited
from warden.server.pool import POOL_LABEL, WARM_UP, WarmPool
from warden.store.db import (
    ACTIVE_STATES,
    DAEMON_OWNER,
    ActiveVM,
    Reservations,
    Store,
    VMRow,
    db_path,
)
from warden.vmm import ownership
from warden.vmm import pause as pausing
from warden.vmm.fork import check_forkable
from warden.vmm.machine import QEMU_BINARY, UNKNOWN_EXIT_CODE, Machine, new_vm_id
from warden.vmm.ownership import Ownership
from warden.vmm.spec import VMSpec
from warden.vmm.state import LIVE_STATES, VMState
from warden.vmm.templates import TemplateInfo, Templates
from warden.vmm.usage import CpuMeter

log = logging.getLogger(__name__)

REATTACH_TIMEOUT_S = 10.0
CPU_SAMPLE_S = 1.0
STOP_TIMEOUT_S = 3.0


@dataclass
class _Held:
    """A VM this manager holds: its machine, a lock for lifecycle changes, its monitor."""

    machine: Machine
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopping: bool = False
    monitor: asyncio.Task[None] | None = None
    marking: asyncio.Task[None] | None = None
    """Recording in the store that the VM turned unhealthy."""


class Manager:
    """Owns VMs: creates, reattaches, stops and removes them, and records all in the store."""

    def __init__(
        self,
        paths: Paths,
        *,
        store: Store | None = None,
        policy: AdmissionPolicy | None = None,
        capacity: HostCapacity | None = None,
        pools: dict[str, int] | None = None,
        auto_pause_s: float | None = None,
        audit: bool = True,
    ) -> None:
        self.paths = paths
        self._audit_on = audit
        """Open the audit log at :meth:`start` (off only for a benchmark's baseline)."""
        self.auto_pause_s = auto_pause_s
        """Stop a VM's vCPUs after this long without a request (None: never; ``vmm/idle.py``)."""
        self.store = store or Store(db_path(paths))
        self.policy = policy or AdmissionPolicy()
        self.capacity = capacity or HostCapacity.from_host()
        self.vms: dict[str, _Held] = {}
        self._final_console: dict[str, str] = {}
        self.cpu = CpuMeter()
        self.meter = UsageMeter()
        """What each running VM uses, for admission (``charge="measured"``)."""
        self._sampler: asyncio.Task[None] | None = None
        self.templates = Templates(paths)
        self.pool = WarmPool(pools or {}, self._pool_member)
        """Ready clones per template (``server/pool.py``); none unless sizes are given."""
        self.audit = Auditor()
        """Records lifecycle changes (``server/audit.py``); the log opens in :meth:`start`."""
        self.links = LinkManager(self)
        """VM-to-VM links (``warden.links``); they die with the daemon."""

    # -- life of the manager -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the audit log; reattach to every live VM of the store; mark dead ones failed
        and free their files."""
        if self._audit_on and self.audit.log is None:
            self.audit = Auditor(await asyncio.to_thread(AuditLog.open, self.paths.home))
        rows = await asyncio.to_thread(self.store.list_vms)
        for row in rows:
            if row.state not in ACTIVE_STATES:
                continue
            await self._recover(row)
        self._sampler = asyncio.create_task(self._sample_cpu(), name="warden-cpu-sampler")
        await asyncio.to_thread(self._load_footprint)
        self.pool.start([held.machine for held in self.vms.values()])

    async def _sample_cpu(self) -> None:
        """Sample the CPU use of every held QEMU (one read of each a second), for
        ``cpu_percent`` (``warden ps``) and admission, and the PSS of those due (off the loop:
        ~1.5 ms a VM; ``policy/meter.py`` says when a VM is due)."""
        while True:
            running = {h.machine.id: h.machine.pid for h in self.vms.values() if h.machine.pid}
            taken = self.meter.sample_cpu(running)
            self.cpu.record({running[vm_id]: used for vm_id, used in taken.items()})
            due = self.meter.memory_due(running)
            if due:
                await asyncio.to_thread(self.meter.sample_memory, due)
            await asyncio.sleep(CPU_SAMPLE_S)

    def _load_footprint(self) -> None:
        """The footprint charged to VMs not measured yet: the policy's (``warden serve``
        calibrates before it starts the manager), else the one saved in $WARDEN_HOME, else
        none: such VMs are charged their limits. The manager never boots a VM by itself."""
        if self.policy.charge != "measured" or self.policy.vm_footprint_mib is not None:
            return
        saved = footprint.load(self.paths)
        if saved is None:
            log.warning(
                "no calibrated footprint of an idle VM: admission charges VMs not measured yet "
                "their limits (run `warden doctor` to calibrate it)"
            )
            return
        self.policy = dataclasses.replace(self.policy, vm_footprint_mib=saved.pss_mib)

    def _charged(self, reserved: Reservations) -> list[VMUsage]:
        """What admission charges: the active VMs of the store."""
        return [self._usage(vm) for vm in reserved.active]

    def _usage(self, vm: ActiveVM) -> VMUsage:
        paused = vm.state == getattr(VMState, "PAUSED", None)
        return self.meter.usage(vm.id, vm.memory_mib, vm.vcpus, paused=paused)

    def cpu_percent(self, row: VMRow) -> float | None:
        """The CPU use of a running VM's QEMU over the last second, in percent of one CPU."""
        return self.cpu.percent(row.qemu_pid) if row.state in LIVE_STATES else None

    async def _recover(self, row: VMRow) -> None:
        rundir = row.runtime_dir or self.paths.vms / row.id
        if row.state is VMState.PAUSED:
            await self._recover_paused(row, rundir)
            return
        alive = row.qemu_pid is not None and ownership.is_alive(row.qemu_pid, row.qemu_start)
        if row.state in LIVE_STATES and alive and row.qemu_pid is not None:
            try:
                machine = await Machine.attach(
                    row.spec(),
                    vm_id=row.id,
                    pid=row.qemu_pid,
                    pid_start=row.qemu_start,
                    paths=self.paths,
                    started_at=row.started_at,
                    timeout=REATTACH_TIMEOUT_S,
                )
            except VMError as exc:
                log.warning("VM %s: %s; marking it failed", row.id, exc)
                await self._fail_row(row.id, rundir, f"reattach failed: {exc}")
                return
            machine.idle.configure(self.auto_pause_s)
            self._hold(machine)
            if row.state is VMState.UNHEALTHY:  # its agent answers a new session again
                await asyncio.to_thread(self.store.update_state, row.id, VMState.RUNNING)
            log.info("VM %s: reattached (pid %s)", row.id, row.qemu_pid)
            return
        if row.state is VMState.STOPPING:
            # A stop was under way: finish it.
            await asyncio.to_thread(ownership.release, rundir)
            await asyncio.to_thread(self.store.update_state, row.id, VMState.STOPPED)
            return
        reason = (
            "QEMU was not running when the manager started"
            if not alive
            else ("the manager died while the VM was being created")
        )
        await self._fail_row(row.id, rundir, reason)

    async def _recover_paused(self, row: VMRow, rundir: Path) -> None:
        """A paused VM has no QEMU: hold it paused, resumable. A QEMU of a resume that the
        last manager did not finish is ended first (its saved state is still there)."""
        await asyncio.to_thread(_end_unfinished_resume, rundir)
        if not await asyncio.to_thread(pausing.is_paused_on_disk, self.paths, row.id):
            await self._fail_row(row.id, rundir, "its saved state is gone; it cannot resume")
            return
        machine = Machine(
            row.spec(),
            paths=self.paths,
            ownership=Ownership.DAEMON,
            vm_id=row.id,
            auto_pause_s=self.auto_pause_s,
        )
        self.vms[row.id] = _Held(pausing.rebuilt(machine))
        log.info("VM %s: held paused", row.id)

    async def _fail_row(self, vm_id: str, rundir: Path, error: str) -> None:
        await asyncio.to_thread(ownership.release, rundir)
        with contextlib.suppress(StateTransitionError, VMNotFoundError):
            await asyncio.to_thread(self.store.update_state, vm_id, VMState.FAILED, error=error)

    async def close(self) -> None:
        """Let go of every VM without stopping it, and close the store. The warm pools' ready
        members are removed: they serve no one, and a stopped daemon should leave no VM it
        made on its own (a restart refills the pools; after a kill -9 it takes them back).
        Links are closed (both ends see an error): they die with the daemon."""
        await self.links.close()
        await self.pool.close()
        for member in self.pool.members():
            with contextlib.suppress(WardenError):
                await self.remove(member.id, force=True)
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for held in list(self.vms.values()):
            if held.monitor is not None:
                held.monitor.cancel()
                with contextlib.suppress(BaseException):
                    await held.monitor
            await held.machine.detach()
        self.vms.clear()
        self.store.close()
        await asyncio.to_thread(self.audit.close)

    # -- lifecycle ---------------------------------------------------------------------------

    @audited("create", lambda a, k, row: {"image": row.image, "template": a[0].template})
    async def create(
        self,
        spec: VMSpec,
        *,
        require_jail: bool = False,
        pool_member: bool = False,
        owner: str = DAEMON_OWNER,
    ) -> VMRow:
        """Admit, record and boot a VM owned by ``owner`` (a principal's name; a pool member
        is the daemon's until a create takes it). A refused create (AdmissionError,
        NameConflictError, JailUnavailableError) leaves no trace; a failed boot leaves a
        ``failed`` row saying why. ``require_jail`` (or the daemon's ``--require-jail``)
        refuses a host that lacks a jail feature: checked before anything is recorded, and
        again by the launch."""
        require_jail = require_jail or default_mode() == "require"
        # A clone has its template's memory and vCPUs: admitted as such (TemplateNotFoundError
        # and a refused seal leave no trace either).
        spec = await asyncio.to_thread(self.templates.resolve, spec)
        if POOL_LABEL in spec.labels and not pool_member:
            raise SpecError(f"the label {POOL_LABEL} is warden's (it marks warm pool members)")
        if not require_jail and self.pool.serves(spec):
            row = await self._from_pool(spec, owner)
            if row is not None:
                return row
        if require_jail:
            await asyncio.to_thread(self._check_jail, spec)
        vm_id = new_vm_id()
        await asyncio.to_thread(self._record, vm_id, spec, owner)
        machine = Machine(
            spec,
            paths=self.paths,
            ownership=Ownership.DAEMON,
            vm_id=vm_id,
            jail="require" if require_jail else None,
            auto_pause_s=self.auto_pause_s,
        )
        try:
            await machine.launch()
        except BaseException as exc:
            self._final_console[vm_id] = machine.console_tail()
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            await asyncio.shield(asyncio.to_thread(self._record_failure, vm_id, error, pool_member))
            raise
        return await self._running(machine)

    def _record(self, vm_id: str, spec: VMSpec, owner: str) -> VMRow:
        """Admit ``spec`` and record it as VM ``vm_id`` (creating), in one write transaction:
        AdmissionError and NameConflictError leave nothing."""

        def admit(reserved: Reservations) -> None:
            request = VMUsage(spec.memory_mib, spec.vcpus)
            check_usage(self.policy, self.capacity, self._charged(reserved), request=request)

        return self.store.create_vm(
            vm_id, spec, runtime_dir=self.paths.vms / vm_id, admit=admit, owner=owner
        )

    async def _running(self, machine: Machine) -> VMRow:
        """Hold a launched VM and record it running (with its QEMU's pid and start time)."""
        pid = machine.pid
        await asyncio.to_thread(
            self.store.set_pid, machine.id, pid, ownership.proc_start_time(pid) if pid else None
        )
        self._hold(machine)
        row = await asyncio.to_thread(self.store.update_state, machine.id, VMState.RUNNING)
        if machine.state is VMState.UNHEALTHY:  # it broke before its row said running
            await self._mark_unhealthy(machine.id, machine.error or "the guest agent broke")
            row = await self.get(machine.id)
        return row

    @audited("fork", lambda a, k, rows: {"n": a[1], "children": ",".join(r.id for r in rows)})
    async def fork(self, id_or_name: str, n: int, *, owner: str = DAEMON_OWNER) -> list[VMRow]:
        """Start ``n`` children of running VM ``id_or_name`` (``Machine.fork``), owned by
        ``owner`` (the fork's caller), each admitted and recorded like a create before the
        parent is paused; it keeps running. A refused
        fork (AdmissionError, RAM in a file, a bad ``n``) leaves no trace; children that
        fail to start leave ``failed`` rows saying why."""
        parent = await self.machine(id_or_name)
        check_forkable(parent, n)
        spec = parent.spec.model_copy(update={"name": None, "template": None})
        ids = [new_vm_id() for _ in range(n)]
        recorded: list[str] = []
        try:
            for vm_id in ids:
                await asyncio.to_thread(self._record, vm_id, spec, owner)
                recorded.append(vm_id)
        except BaseException:
            for vm_id in recorded:
                await asyncio.shield(asyncio.to_thread(self._record_failure, vm_id, "", True))
            raise
        try:
            children = await parent.fork(n, vm_ids=ids)
        except BaseException as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            for vm_id in ids:
                await asyncio.shield(asyncio.to_thread(self._record_failure, vm_id, error, False))
            raise
        return [await self._running(child) for child in children]

    def _record_failure(self, vm_id: str, error: str, pool_member: bool) -> None:
        """A launch failed: its row says why; a pool member's (no one asked for it, and a
        stopping daemon cancels a refill) is removed."""
        self.store.update_state(vm_id, VMState.FAILED, error=error)
        if pool_member:
            self.store.delete_vm(vm_id)

    async def _from_pool(self, spec: VMSpec, owner: str) -> VMRow | None:
        """Hand a ready pool member to the create of ``spec`` by ``owner`` (None: none is
        ready)."""
        assert spec.template is not None
        machine = self.pool.take(spec.template)
        if machine is None:
            return None
        try:
            row = await asyncio.to_thread(self.store.hand_over, machine.id, spec, owner=owner)
        except NameConflictError:
            self.pool.put_back(spec.template, machine)
            raise
        machine.spec = spec
        return row

    async def _pool_member(self, spec: VMSpec) -> Machine:
        """Create a warm pool member: admitted and recorded like any VM, then warmed up; a
        member that fails its warm-up is removed."""
        row = await self.create(spec, pool_member=True)
        machine = self.vms[row.id].machine
        try:
            for command in WARM_UP:
                await machine.agent.exec(command, timeout=60.0)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.remove(row.id, force=True)
            raise
        return machine

    def _check_jail(self, spec: VMSpec) -> None:
        """JailUnavailableError if this host lacks a jail feature for ``spec``'s image (the
        check its launch makes; a missing QEMU or image is the launch's to report)."""
        qemu = shutil.which(QEMU_BINARY)
        if qemu is not None:
            image = load_image(self.paths, spec.image)
            features.require(self.paths, qemu, image.kernel.path)

    def _hold(self, machine: Machine) -> None:
        held = _Held(machine)
        self.vms[machine.id] = held
        machine.on_unhealthy = self._on_unhealthy
        held.monitor = asyncio.create_task(self._monitor(held), name=f"warden-monitor-{machine.id}")

    def _on_unhealthy(self, machine: Machine, reason: str) -> None:
        """A held VM's agent connection broke: record it (``ps``/``inspect`` show the reason)."""
        held = self.vms.get(machine.id)
        if held is not None and held.machine is machine:
            held.marking = asyncio.create_task(
                self._mark_unhealthy(machine.id, reason), name=f"warden-unhealthy-{machine.id}"
            )

    async def _mark_unhealthy(self, vm_id: str, reason: str) -> None:
        # Refused if a stop or the QEMU's exit got there first; that state says more.
        with contextlib.suppress(StateTransitionError, VMNotFoundError):
            await asyncio.to_thread(self.store.update_state, vm_id, VMState.UNHEALTHY, error=reason)

    async def _monitor(self, held: _Held) -> None:
        """Notice a QEMU that dies on its own: mark its row failed (Machine frees its files)."""
        machine = held.machine
        code = await machine.wait()
        if held.stopping:
            return
        # Machine's own watcher marks it failed and cleans up; give it a moment.
        for _ in range(100):
            if machine.state not in LIVE_STATES:
                break
            await asyncio.sleep(0.01)
        log.warning("VM %s: QEMU exited on its own (code %s)", machine.id, code)
        self._final_console[machine.id] = machine.console_tail()
        with contextlib.suppress(StateTransitionError, VMNotFoundError):
            await asyncio.to_thread(
                self.store.update_state,
                machine.id,
                VMState.FAILED,
                exit_code=None if code == UNKNOWN_EXIT_CODE else code,
                error="QEMU exited on its own",
            )
        self.vms.pop(machine.id, None)

    @audited("stop")
    async def stop(self, vm_id: str, *, force: bool = False) -> VMRow:
        """Stop a running or unhealthy VM (QMP quit, then SIGKILL; at once with ``force``)."""
        row = await self.get(vm_id)
        held = self.vms.get(row.id)
        if (row.state not in LIVE_STATES and row.state is not VMState.PAUSED) or held is None:
            if row.state in (VMState.STOPPED, VMState.FAILED):
                return row
            raise StateTransitionError(
                f"VM {row.id} is {row.state.value}; it cannot be stopped now"
            )
        async with held.lock:
            if self.vms.get(row.id) is not held:  # a concurrent stop won the race
                return await self.get(row.id)
            held.stopping = True
            if held.marking is not None:  # let the unhealthy mark land first: one order
                with contextlib.suppress(Exception):
                    await held.marking
            await asyncio.to_thread(self.store.update_state, row.id, VMState.STOPPING)
            machine = held.machine
            try:
                if force:
                    await machine.kill()
                else:
                    await machine.shutdown(timeout=STOP_TIMEOUT_S)
            finally:
                if held.monitor is not None:
                    held.monitor.cancel()
                self._final_console[row.id] = machine.console_tail()
                self.vms.pop(row.id, None)
                code = machine.exit_code
                row = await asyncio.to_thread(
                    self.store.update_state,
                    row.id,
                    VMState.STOPPED,
                    exit_code=None if code in (None, UNKNOWN_EXIT_CODE) else code,
                )
        return row

    @audited("rm", lambda a, k, _: {"force": bool(k.get("force"))})
    async def remove(self, vm_id: str, *, force: bool = False) -> None:
        """Remove a VM's row; a running VM only with ``force`` (it is killed first)."""
        row = await self.get(vm_id)
        if row.state is VMState.CREATING:
            raise StateTransitionError(
                f"VM {row.id} is being created; remove it once it is running or failed"
            )
        if row.state in ACTIVE_STATES:
            if not force:
                raise StateTransitionError(
                    f"VM {row.id} is {row.state.value}; stop it first, or remove it with force"
                )
            if row.id in self.vms:
                await self.stop(row.id, force=True)
            else:
                await self._fail_row(
                    row.id, row.runtime_dir or self.paths.vms / row.id, "removed while not held"
                )
        await asyncio.to_thread(self.store.delete_vm, row.id)
        self._final_console.pop(row.id, None)

    # -- queries -----------------------------------------------------------------------------

    async def get(self, id_or_name: str) -> VMRow:
        row = await asyncio.to_thread(self.store.get_vm, id_or_name)
        if row is None:
            row = await asyncio.to_thread(self.store.get_vm_by_name, id_or_name)
        if row is None:
            raise VMNotFoundError(
                f"no VM has id or name {id_or_name!r}; `warden ps --all` lists them"
            )
        return row

    async def list(self, *, all: bool = False) -> list[VMRow]:
        """Active VMs but the warm pools' members; with ``all``, every VM."""
        rows = await asyncio.to_thread(self.store.list_vms, all=all)
        return rows if all else [r for r in rows if POOL_LABEL not in r.labels]

    async def machine(self, id_or_name: str) -> Machine:
        """The running machine of a VM; StateTransitionError (409) if it is not running.

        On the hot path (every exec and file call) a held, running VM is found in memory,
        without a trip to the database.
        """
        held = self.vms.get(id_or_name) or next(
            (h for h in self.vms.values() if h.machine.spec.name == id_or_name), None
        )
        if held is not None and held.machine.state is VMState.RUNNING:
            return held.machine
        row = await self.get(id_or_name)
        held = self.vms.get(row.id)
        if held is not None and held.machine.state is VMState.UNHEALTHY:
            raise StateTransitionError(
                f"VM {row.id} is unhealthy ({held.machine.error}); it cannot run anything: "
                f"stop and remove it (`warden rm -f {row.id}`)"
            )
        if held is not None and held.machine.state is VMState.PAUSED:
            raise StateTransitionError(pausing.paused_message(row.id))
        if held is None or held.machine.state is not VMState.RUNNING:
            raise StateTransitionError(f"VM {row.id} is {row.state.value}, not running")
        return held.machine

    @audited("template", lambda a, k, _: {"template": a[1]})
    async def save_template(
        self, id_or_name: str, name: str, *, owner: str = DAEMON_OWNER
    ) -> TemplateInfo:
        """Save running VM ``id_or_name`` as template ``name``; it keeps running. ``owner``
        (who saved it) is recorded in its meta."""
        machine = await self.machine(id_or_name)
        extra = {"source": machine.id, "owner": owner}
        await machine.save_template(name, keep_running=True, extra=extra)
        info = await asyncio.to_thread(self.templates.info, name)
        if info is None:
            raise VMError(f"template {name!r} was saved but cannot be read back")
        return info

    @audited("template-rm", lambda a, k, _: {"template": a[0]}, sandbox=False)
    async def remove_template(self, name: str) -> None:
        """Delete template ``name`` (its clones keep running)."""
        await asyncio.to_thread(self.templates.remove, name)

    def idle_paused(self, vm_id: str) -> bool:
        """Whether the idle timer has stopped this VM's vCPUs (it stays ``running``)."""
        held = self.vms.get(vm_id)
        return held is not None and held.machine.idle.stopped

    # -- pause and resume --------------------------------------------------------------------

    @audited("pause")
    async def pause(self, vm_id: str) -> VMRow:
        """Save a running VM to its sealed file and end its QEMU (``vmm/pause.py``); 409 if
        it is not running (or has requests in flight)."""
        async with self._locked_in(vm_id, VMState.RUNNING, "paused") as (row, held):
            monitor, held.monitor = held.monitor, None
            if monitor is not None:  # QEMU is about to quit on purpose
                monitor.cancel()
                with contextlib.suppress(BaseException):
                    await monitor
            try:
                await held.machine.pause()
            finally:
                if held.machine.state is not VMState.PAUSED:
                    held.monitor = self._watch(held)
            await asyncio.to_thread(self.store.set_pid, row.id, None, None)
            return await asyncio.to_thread(self.store.update_state, row.id, VMState.PAUSED)

    @audited("resume")
    async def resume(self, vm_id: str) -> VMRow:
        """Start a paused VM again from its verified saved state; 409 if it is not paused or
        its saved state is refused."""
        async with self._locked_in(vm_id, VMState.PAUSED, "resumed") as (row, held):
            machine = held.machine
            if machine.state is VMState.PAUSED:  # else a concurrent resume did it
                await machine.resume()
                pid = machine.pid
                start = ownership.proc_start_time(pid) if pid else None
                await asyncio.to_thread(self.store.set_pid, row.id, pid, start)
                held.monitor = self._watch(held)
            return await asyncio.to_thread(self.store.update_state, row.id, VMState.RUNNING)

    @contextlib.asynccontextmanager
    async def _locked_in(
        self, vm_id: str, state: VMState, done: str
    ) -> AsyncIterator[tuple[VMRow, _Held]]:
        """The VM ``vm_id``'s row and holding, under its lock, if it is in ``state`` and not
        being stopped; else StateTransitionError (only a VM in ``state`` can be ``done``)."""
        row = await self.get(vm_id)
        held = self.vms.get(row.id)
        if row.state is not state or held is None:
            raise StateTransitionError(
                f"VM {row.id} is {row.state.value}; only a {state.value} VM can be {done}"
            )
        async with held.lock:
            if self.vms.get(row.id) is not held or held.stopping:
                raise StateTransitionError(f"VM {row.id} is being stopped")
            yield row, held

    def _watch(self, held: _Held) -> asyncio.Task[None]:
        return asyncio.create_task(self._monitor(held), name=f"warden-monitor-{held.machine.id}")

    async def console(self, id_or_name: str, lines: int = 100) -> str:
        row = await self.get(id_or_name)
        held = self.vms.get(row.id)
        if held is not None:
            return held.machine.console_tail(lines)
        return self._final_console.get(row.id, "")

    async def info(self) -> dict[str, object]:
        reserved = await asyncio.to_thread(self.store.reservations)
        p, c = self.policy, self.capacity
        charged = Charges.of(p, self._charged(reserved))
        return {
            "capacity": {"memory_mib": c.memory_mib, "cpus": c.cpus},
            "policy": {
                "memory_overcommit": p.memory_overcommit,
                "vcpu_overcommit": p.vcpu_overcommit,
                "reserved_host_memory_mib": p.reserved_host_memory_mib,
                "vm_overhead_mib": p.vm_overhead_mib,
                "charge": p.charge,
                "vm_footprint_mib": p.vm_footprint_mib,
                "vm_headroom_mib": p.vm_headroom_mib,
                "cpu_busy_limit": p.cpu_busy_limit,
            },
            "limits": {"memory_mib": p.memory_limit_mib(c), "vcpus": p.vcpu_limit(c)},
            "reservations": {
                "memory_mib": reserved.memory_mib,
                "charged_memory_mib": charged.memory_mib,
                "vcpus": reserved.vcpus,
                "charged_vcpus": round(charged.vcpus, 3),
                "measured_cpu_load": round(charged.measured_load, 3),
                "vms": reserved.vms,
                "measured_vms": charged.measured,
            },
            "held": len(self.vms),
            "pools": self.pool.counts(),
            "time": time.time(),
        }


def _end_unfinished_resume(rundir: Path) -> None:
    """Kill the QEMU that a resume started if its manager died before recording it."""
    data = ownership.read_owner(rundir) or {}
    pid, start = data.get("qemu_pid"), data.get("qemu_start")
    if isinstance(pid, int) and ownership.is_alive(pid, start if isinstance(start, int) else None):
        ownership.kill_verified(pid, start if isinstance(start, int) else None, rundir, 2.0)
