"""The argv builder is pure: the same spec gives the same list, and no shell string."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden._errors import SpecError
from warden.vmm.argv import (
    AGENT_PORT_NAME,
    BootFiles,
    RuntimeFiles,
    build_argv,
    host_tsc_khz,
    kernel_cmdline,
)
from warden.vmm.spec import MIN_MEMORY_MIB, VMSpec

BOOT = BootFiles(Path("/img/vmlinuz"), Path("/img/initrd.img"), Path("/img/rootfs.sqfs"))
RUN = RuntimeFiles(Path("/var/lib/warden/run/vms/abc123"))


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_without_defaults_or_nic() -> None:
    argv = build_argv(VMSpec(), BOOT, RUN, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-M")[0].startswith("microvm,")
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert not any("netdev" in a or "virtio-net" in a for a in argv)
    devices = _opt(argv, "-device")
    # The rootfs disk comes first so the guest sees it as /dev/vda.
    assert devices[0].startswith("virtio-blk-device")
    assert any(d.startswith("virtserialport") and AGENT_PORT_NAME in d for d in devices)
    assert all(isinstance(a, str) for a in argv)


@given(
    vcpus=st.integers(min_value=1, max_value=8),
    memory=st.integers(min_value=MIN_MEMORY_MIB, max_value=8192),
)
def test_resources_follow_the_spec(vcpus: int, memory: int) -> None:
    argv = build_argv(VMSpec(vcpus=vcpus, memory_mib=memory), BOOT, RUN, accel="tcg")
    assert _opt(argv, "-smp") == [str(vcpus)]
    assert _opt(argv, "-m") == [f"{memory}M"]
    assert f"size={memory}M" in _opt(argv, "-object")[0]


def test_the_pit_is_left_out_only_under_tcg_with_a_known_tsc() -> None:
    """Without a PIT the guest must not calibrate its TSC against one: only a guest told its
    TSC's frequency (tsc_early_khz) loses it, only under TCG, and not the stock peer."""

    def machine(**kw: Any) -> str:
        argv = build_argv(VMSpec(), BOOT, RUN, **kw)
        told = "tsc_early_khz=" in _opt(argv, "-append")[0]
        assert ("pit=off" in _opt(argv, "-M")[0]) == (told and kw["accel"] == "tcg")
        return _opt(argv, "-M")[0]

    assert "pit=off," in machine(accel="tcg", tsc_khz=2_600_000)
    assert "pit=off" not in machine(accel="tcg")
    assert "pit=off" not in machine(accel="kvm", tsc_khz=2_600_000)
    stock = build_argv(VMSpec(), BOOT, RUN, accel="tcg", tsc_khz=2_600_000, tune=False)
    assert "pit=off" not in _opt(stock, "-M")[0]


def test_accelerator_options() -> None:
    tcg = build_argv(VMSpec(), BOOT, RUN, accel="tcg")
    kvm = build_argv(VMSpec(), BOOT, RUN, accel="kvm")
    assert _opt(tcg, "-accel")[0].startswith("tcg,tb-size=")
    assert _opt(kvm, "-accel") == ["kvm"]
    assert _opt(kvm, "-cpu") == ["host,-arch-capabilities"]
    with pytest.raises(ValueError, match="resolved"):
        build_argv(VMSpec(), BOOT, RUN, accel="auto")


def test_file_backed_memory_is_shareable() -> None:
    argv = build_argv(VMSpec(memory_backend="file"), BOOT, RUN, accel="tcg")
    backend = _opt(argv, "-object")[0]
    assert backend.startswith("memory-backend-file,") and "share=on" in backend
    assert f"mem-path={RUN.memory}" in backend


def test_console_goes_to_a_socket_when_the_host_caps_it() -> None:
    plain = _opt(build_argv(VMSpec(), BOOT, RUN, accel="tcg"), "-chardev")
    capped = _opt(build_argv(VMSpec(), BOOT, RUN, accel="tcg", console_socket=True), "-chardev")
    assert f"file,id=console,path={RUN.console}" in plain
    # QEMU waits for the host's reader before the guest runs, so no boot message is lost.
    assert f"socket,id=console,path={RUN.console_sock},server=on,wait=on" in capped
    assert not any(c.startswith("file,") for c in capped)


def test_paths_with_spaces_stay_one_argument() -> None:
    boot = BootFiles(Path("/a b/vmlinuz"), Path("/a b/initrd"), Path("/a b/root fs"))
    argv = build_argv(VMSpec(), boot, RUN, accel="tcg")
    assert _opt(argv, "-kernel") == ["/a b/vmlinuz"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"memory_mib": 0}, "memory_mib"),
        ({"vcpus": -1}, "vcpus"),
        ({"vcpus": 0}, "vcpus"),
        ({"name": "Bad Name"}, "name"),
        ({"image": "../etc"}, "image"),
        ({"env": {"1X": "y"}}, "env"),
        ({"colour": "red"}, "unknown option"),
        ({"memory_mib": 10**6}, "memory_mib"),
    ],
)
def test_invalid_specs_are_refused_with_the_option_named(
    fields: dict[str, Any], needle: str
) -> None:
    with pytest.raises(SpecError, match=needle):
        VMSpec.parse(**fields)


def test_kernel_cmdline_tunes_tcg_only() -> None:
    tcg = kernel_cmdline("agent", accel="tcg", tsc_khz=2596134)
    kvm = kernel_cmdline("agent", accel="kvm", tsc_khz=None)
    assert "mitigations=off" in tcg.split() and "mitigations=off" not in kvm.split()
    assert "norandmaps" in tcg.split() and "norandmaps" not in kvm.split()
    assert "tsc_early_khz=2596134" in tcg.split() and "tsc_early_khz" not in kvm
    assert "warden.mode=agent" in tcg.split() and "warden.mode=agent" in kvm.split()
    assert "reboot=t" in kvm.split()
    # OpenSSL's scalar crypto in the agent under TCG only; plaintext only when asked for.
    assert "warden.crypto=scalar" in tcg.split() and "warden.crypto=scalar" not in kvm
    assert "warden.channel" not in tcg + kvm
    plain = kernel_cmdline("agent", accel="tcg", plaintext=True).split()
    assert "warden.channel=plain" in plain and "warden.crypto=scalar" not in plain


def test_kernel_cmdline_quiets_an_idle_guest_unless_stock() -> None:
    for accel in ("tcg", "kvm"):
        tuned = kernel_cmdline("agent", accel=accel).split()
        assert {"nowatchdog", "sysctl.vm.stat_interval=120"} <= set(tuned)
        assert "sysctl.vm.compaction_proactiveness=0" in tuned
        stock = kernel_cmdline("agent", accel=accel, tune=False)
        assert "nowatchdog" not in stock and "sysctl." not in stock


def test_the_channel_secret_goes_through_fw_cfg_in_agent_mode_only() -> None:
    def fw_cfg(argv: list[str]) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == "-fw_cfg"]

    agent = build_argv(VMSpec(), BOOT, RUN, accel="tcg")
    assert fw_cfg(agent) == [f"name=opt/warden/key,file={RUN.dir / 'channel.key'}"]
    assert fw_cfg(build_argv(VMSpec(), BOOT, RUN, accel="tcg", plaintext=True)) == []
    assert fw_cfg(build_argv(VMSpec(), BOOT, RUN, accel="kvm", mode="probe")) == []


def test_host_tsc_khz_needs_a_constant_tsc() -> None:
    good = "processor\t: 0\ncpu MHz\t\t: 2596.134\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"
    assert host_tsc_khz(good) == 2596134
    assert host_tsc_khz(good.replace("constant_tsc ", "")) is None
    assert host_tsc_khz("flags: constant_tsc nonstop_tsc\n") is None
