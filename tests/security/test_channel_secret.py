"""Each VM's channel secret, against real VMs (embedded SDK): where it is, and where it is not.

* It reaches the guest only through fw_cfg: QEMU's command line names a file, never the secret;
  the file is the runtime dir's, 0600, and gone once the guest has it; QEMU's environment does
  not hold it either.
* In the guest only root can read it; the workload (``user``) cannot.
* The host keeps it 0600 under ``keys/vm/`` while the VM lives, and forgets it with the VM.
* A boot template whose kept secret does not open its guest's channel is not used: the VM
  boots cold, and a new template (with the right secret) replaces it. Nothing is left behind.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from warden import Sandbox
from warden.config import Paths
from warden.vmm.channel_keys import ChannelKeys
from warden.vmm.machine import Machine

pytestmark = pytest.mark.vm

MEMORY = 224
"""A memory size no other test uses: these tests own the boot template of this shape."""
FW_CFG_BLOB = "/sys/firmware/qemu_fw_cfg/by_name/opt/warden/key/raw"


def _machine(sbx: Sandbox) -> Machine:
    machine = sbx._inner._machine
    assert isinstance(machine, Machine)  # an embedded sandbox
    return machine


def test_the_secret_is_in_no_command_line_environment_or_file_but_the_keys(
    no_leaks: None,
) -> None:
    keys = ChannelKeys(Paths.from_env())
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        machine = _machine(sbx)
        secret = keys.current(machine.id)
        assert secret is not None and len(secret) == 32
        key_file = keys.store.path(f"vm/{machine.id}")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.stat().st_uid == 0
        assert not machine.run.channel_key.exists(), "the fw_cfg file outlived the boot"
        assert machine.pid is not None
        for what in ("cmdline", "environ"):
            data = Path(f"/proc/{machine.pid}/{what}").read_bytes()
            assert secret not in data and secret.hex().encode() not in data, what
        argv = Path(f"/proc/{machine.pid}/cmdline").read_bytes().split(b"\0")
        assert f"name=opt/warden/key,file={machine.run.channel_key}".encode() in argv
        # In the guest: root can read the blob (it owns its guest), the workload cannot.
        as_user = sbx.commands.run(f"cat {FW_CFG_BLOB} | wc -c")
        assert "Permission denied" in as_user.stderr and as_user.stdout.strip() == "0"
        run_dir = machine.run.dir
    assert keys.current(machine.id) is None and not key_file.exists()
    assert not run_dir.exists()


def test_a_boot_template_whose_secret_fails_boots_cold_and_is_made_again(
    no_leaks: None,
) -> None:
    keys = ChannelKeys(Paths.from_env())
    with Sandbox.create(memory_mib=MEMORY) as sbx:  # makes the template if there is none
        name = _machine(sbx).boot_template
    assert name is not None
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"
    keys.save_template(name, bytes(32))  # not the secret inside the template's guest
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        machine = _machine(sbx)
        assert machine.booted_from == "cold"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    fresh = keys.template(name)
    assert fresh is not None and fresh != bytes(32), "no new template with its own secret"
    with Sandbox.create(memory_mib=MEMORY) as sbx:
        assert _machine(sbx).booted_from == "template"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
