"""Turn a VM spec into QEMU's argv. Pure: no I/O, returns a list, never a shell string."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from warden.vmm import linkslots
from warden.vmm.spec import VMSpec
from warden.wire.frame import XFER_SERIAL

AGENT_PORT_NAME = "org.warden.agent.0"
QGA_PORT_NAME = "org.qemu.guest_agent.0"

# Translation-block cache per VM under TCG. QEMU 7.2 reserves 1 GiB by default, touched as
# code is translated; 256 MiB caps what one VM's translated code can take of host memory while
# leaving room for the kernel, the agent and user programs before the cache is flushed.
TCG_TB_SIZE_MIB = 256

# The transfer window: XFER_SLOTS slots of XFER_SLOT_SIZE bytes (a sparse file per VM).
XFER_SLOT_SIZE = 1 << 20
XFER_SLOTS = 16

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
"""QEMU's seccomp filter (``-sandbox``): no obsolete system calls, no set*uid/gid, no
fork/exec, no scheduler or affinity changes."""


class PassedFd:
    """The fd numbers at which a jailed QEMU gets the sockets it may not make itself
    (``jail/``): the host binds them in the root-only runtime dir, QEMU only accepts."""

    QMP = 3
    AGENT = 4
    CONSOLE = 5
    INCOMING = 6
    """A saved state being loaded (``-incoming fd:6``): a template's device state, a pause file."""
    TEMPLATE_RAM = 7
    """A clone's template RAM (a sealed memfd): QEMU maps ``/proc/self/fd/7``."""


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    rootfs: Path


@dataclass(frozen=True)
class RuntimeFiles:
    """The per-VM runtime dir and the files QEMU makes in it."""

    dir: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def console_sock(self) -> Path:
        """QEMU's console socket: the host reads it into ``console`` (``vmm/console.py``)."""
        return self.dir / "console.sock"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def memory(self) -> Path:
        return self.dir / "memory.ram"

    @property
    def xfer(self) -> Path:
        """The file behind the guest's transfer-window disk (bulk host-to-guest data)."""
        return self.dir / "xfer.img"

    @property
    def channel_key(self) -> Path:
        """The VM's channel secret for QEMU's ``-fw_cfg`` (0600; removed once the guest has
        read it)."""
        return self.dir / "channel.key"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


IDLE_ARGS = ["nowatchdog", "sysctl.vm.stat_interval=120", "sysctl.vm.compaction_proactiveness=0"]
"""Kernel arguments that make an idle guest wake less often (:func:`kernel_cmdline`)."""


def kernel_cmdline(
    mode: str = "agent",
    *,
    accel: str = "tcg",
    tsc_khz: int | None = None,
    tune: bool = True,
    plaintext: bool = False,
) -> str:
    """The guest kernel's command line.

    * ``reboot=t``: a reboot triple-faults at once, and ``-no-reboot`` turns that into QEMU's
      exit. The default method first probes an ACPI reset and a keyboard controller that
      microvm lacks, which sometimes stalls.
    * ``tsc_early_khz`` + ``tsc=reliable``: under TCG the guest TSC is the host's, so we tell
      the guest its frequency. Calibrating it against the PIT fails when the host is busy,
      and the guest then hangs at boot (seen here under load).
    * ``mitigations=off`` under TCG only: TCG does not execute speculatively, so the guest
      kernel's Spectre/Meltdown mitigations (PTI's TLB flush on every syscall, above all)
      cost time and protect nothing. Under KVM they stay on.
    * ``norandmaps`` under TCG only: TCG caches translated code by virtual address too, so
      with address-space randomization every new process maps ld.so and libc elsewhere and
      all its code is translated again. Without it, spawning ``/bin/true`` in the guest takes
      6 ms instead of 27 ms (measured here). ASLR only hardens guest processes against each
      other inside one sandbox; the isolation boundary is the VM. Under KVM it stays on.

    * ``warden.crypto=scalar`` under TCG only: the agent runs OpenSSL's scalar ChaCha20 and
      Poly1305, which TCG runs 2-3x faster than the SIMD code (``guest/pid1.py``).
    * ``warden.channel=plain`` with ``plaintext``: the agent serves the channel without its
      crypto layer. Only the benchmark asks for it, to measure that layer's cost.

    * ``nowatchdog``, ``sysctl.vm.stat_interval=120``, ``sysctl.vm.compaction_proactiveness=0``:
      an idle guest wakes less often (the soft-lockup watchdog's timer, the per-second fold of
      the memory counters, proactive compaction's checks), and each wake-up of an idle guest
      is a run of its vCPU on the host. Idle QEMUs used 0.33-0.35% of a core each with these
      against 0.70-0.76% without (10 VMs, 5 each, three 30 s windows, one run).

    ``tune=False`` leaves out the speed and idle settings (the benchmark's stock peer uses it).
    """
    parts = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
    if tsc_khz:
        parts += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
    if accel == "tcg" and tune:
        parts += ["mitigations=off", "norandmaps"]
    if tune:
        parts += IDLE_ARGS
    parts.append(f"warden.mode={mode}")
    if mode == "agent" and plaintext:
        parts.append("warden.channel=plain")
    elif mode == "agent" and accel == "tcg":
        parts.append("warden.crypto=scalar")
    return " ".join(parts)


def host_tsc_khz(cpuinfo: str) -> int | None:
    """The host TSC frequency in kHz, when /proc/cpuinfo shows it is constant and known."""
    flags: set[str] = set()
    mhz: float | None = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
    if mhz is None or not {"constant_tsc", "nonstop_tsc"} <= flags:
        return None
    return round(mhz * 1000)


def build_argv(
    spec: VMSpec,
    boot: BootFiles,
    run: RuntimeFiles,
    *,
    accel: str,
    qemu: str = "qemu-system-x86_64",
    mode: str = "agent",
    agent_port: str = AGENT_PORT_NAME,
    tsc_khz: int | None = None,
    tune: bool = True,
    console_socket: bool = False,
    passed_fds: bool = False,
    sandbox: bool = False,
    plaintext: bool = False,
    clone_ram: str | None = None,
    link_slots: int = 0,
) -> list[str]:
    """Return QEMU's argv for ``spec``. ``accel`` is the resolved accelerator: kvm or tcg.

    ``console_socket`` serves the serial console on ``run.console_sock`` for the host to read
    into a capped log (``vmm/console.py``); QEMU then waits for that connection before it
    starts the guest. Without it QEMU writes ``run.console`` itself, with no cap: only for
    boots that run no workload (the accelerator probe, the benchmark's peer).

    ``link_slots`` empty hotplug root ports (``vmm/linkslots.py``) take links' shared memory
    later; the machine then has a PCIe root complex (``pcie=on``) and the guest's pciehp.

    ``passed_fds`` (a jailed QEMU, which can make no file): QEMU gets its QMP, agent and
    console sockets as fds at the numbers of :class:`PassedFd`, and writes no pid file.
    ``sandbox`` turns on QEMU's seccomp filter.

    In ``agent`` mode the guest reads its channel secret from ``run.channel_key`` through
    fw_cfg, unless ``plaintext`` (the benchmark's channel without crypto).

    Guest RAM is a memfd that QEMU maps shared (``memory-backend-memfd,share=on``), so the host
    can copy it into a template (``vmm/templates.py``). ``clone_ram`` makes a clone of a
    template instead: guest RAM maps that file (the template's sealed memfd) copy-on-write;
    the caller adds ``-incoming defer`` and loads the device state (no RAM section in it).
    """
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be resolved to kvm or tcg, not {accel!r}")
    if passed_fds and not console_socket:
        raise ValueError("a jailed QEMU serves its console on a passed socket")
    return [
        qemu,
        *_machine_args(spec, run, accel, clone_ram, link_slots, quiet_pit=bool(tsc_khz) and tune),
        *_boot_args(boot, accel, mode, tsc_khz, tune, plaintext, link_slots),
        *_console_args(run, console_socket, passed_fds),
        *_device_args(boot, run, agent_port, passed_fds),
        *linkslots.slot_args(link_slots),
        *(_secret_args(run) if mode == "agent" and not plaintext else []),
        *(["-sandbox", SANDBOX] if sandbox else []),
    ]


def _memory_args(spec: VMSpec, run: RuntimeFiles, clone_ram: str | None) -> list[str]:
    """Guest RAM: shared in a memfd (or a file), or a template's RAM mapped copy-on-write."""
    mem = f"{spec.memory_mib}M"
    if clone_ram is not None:
        return ["-object", f"memory-backend-file,id=mem,size={mem},mem-path={clone_ram},share=off"]
    if spec.memory_backend == "file":
        return ["-object", f"memory-backend-file,id=mem,size={mem},mem-path={run.memory},share=on"]
    return ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]


def _machine_args(
    spec: VMSpec,
    run: RuntimeFiles,
    accel: str,
    clone_ram: str | None = None,
    link_slots: int = 0,
    *,
    quiet_pit: bool = False,
) -> list[str]:
    """The machine: microvm, the accelerator, CPUs and memory; no default devices.
    ``quiet_pit``: leave the PIT out under TCG (the guest was told its TSC's frequency, so it
    does not calibrate against the PIT)."""
    mem = f"{spec.memory_mib}M"
    accel_opt = "kvm" if accel == "kvm" else f"tcg,tb-size={TCG_TB_SIZE_MIB}"
    # Under TCG, no ERMS: with it the guest kernel copies and zeroes with `rep movsb`, which TCG
    # runs about a byte a step (~300 MB/s a copy); without it, 64-bit moves. Exec output went
    # from 48 to 109 MB/s (measured in one run, all else equal); start and exec were unchanged.
    cpu = "host,-arch-capabilities" if accel == "kvm" else "max,-erms"
    pcie = linkslots.machine_option(link_slots)
    # Under TCG, no i8254 PIT: QEMU's main loop emulated its 18.2 Hz tick for an idle guest
    # that never reads it (37 wake-ups/s, 0.45-0.5% of a core per idle QEMU; 0.8/s and ~0%
    # without; the guest keeps time with the TSC and its local APIC timer). Measured in one
    # run, cold boots (docs/benchmarks.md, "Pause, resume and auto-pause": "no PIT").
    pit = "pit=off," if accel == "tcg" and quiet_pit else ""
    return [
        "-name", f"warden-{run.dir.name},debug-threads=on",
        "-M", f"microvm,{pcie}{pit}memory-backend=mem,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", accel_opt,
        "-cpu", cpu,
        "-smp", str(spec.vcpus),
        "-m", mem,
        *_memory_args(spec, run, clone_ram),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        # Saved states carry no configuration section: a device state saved without RAM
        # (snapshot.save_device_state) has none, and every state must load in every QEMU.
        "-global", "migration.send-configuration=off",
    ]  # fmt: skip


def _boot_args(
    boot: BootFiles,
    accel: str,
    mode: str,
    tsc_khz: int | None,
    tune: bool,
    plaintext: bool,
    link_slots: int = 0,
) -> list[str]:
    """The direct kernel boot: kernel, initrd and command line."""
    cmdline = kernel_cmdline(mode, accel=accel, tsc_khz=tsc_khz, tune=tune, plaintext=plaintext)
    if link_slots:
        cmdline = " ".join([cmdline, *linkslots.KERNEL_ARGS])
    return [
        "-kernel", str(boot.kernel),
        "-initrd", str(boot.initrd),
        "-append", cmdline,
    ]  # fmt: skip


def _secret_args(run: RuntimeFiles) -> list[str]:
    """The channel secret, as the fw_cfg file ``opt/warden/key`` (QEMU reads the file when it
    starts; the guest reads the blob from sysfs, mode 0400 root)."""
    return ["-fw_cfg", f"name=opt/warden/key,file={run.channel_key}"]


def _console_args(run: RuntimeFiles, console_socket: bool, passed_fds: bool) -> list[str]:
    """The serial console: a socket the host reads, or a file QEMU writes."""
    if passed_fds:
        console = f"socket,id=console,fd={PassedFd.CONSOLE},server=on,wait=on"
    elif console_socket:
        console = f"socket,id=console,path={run.console_sock},server=on,wait=on"
    else:
        console = f"file,id=console,path={run.console}"
    return [
        "-chardev", console,
        "-serial", "chardev:console",
    ]  # fmt: skip


def _device_args(
    boot: BootFiles, run: RuntimeFiles, agent_port: str, passed_fds: bool
) -> list[str]:
    """The rootfs disk, the agent's virtio-serial port, the transfer window, QMP, pidfile."""
    if passed_fds:
        agent = f"socket,id=agent,fd={PassedFd.AGENT},server=on,wait=off"
    else:
        agent = f"socket,id=agent,path={run.agent},server=on,wait=off"
    return [
        "-drive", f"id=root,file={boot.rootfs},if=none,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", agent,
        "-device", f"virtserialport,chardev=agent,name={agent_port}",
        # Last, so the rootfs stays /dev/vda; the guest finds this one by its serial.
        "-drive", f"id=xfer,file={run.xfer},if=none,format=raw,cache=writeback",
        "-device", f"virtio-blk-device,drive=xfer,serial={XFER_SERIAL}",
        *_monitor_args(run, passed_fds),
    ]  # fmt: skip


def _monitor_args(run: RuntimeFiles, passed_fds: bool) -> list[str]:
    """QMP on a unix socket (QEMU's own, or the host's passed to it), and the pid file."""
    if passed_fds:
        return [
            "-chardev", f"socket,id=qmp,fd={PassedFd.QMP},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
    return [
        "-qmp", f"unix:{run.qmp},server=on,wait=off",
        "-pidfile", str(run.pidfile),
    ]  # fmt: skip
