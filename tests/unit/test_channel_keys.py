"""Each VM's channel secret in the key store: made, re-keyed, kept across a cut re-key."""

from __future__ import annotations

import stat
from pathlib import Path

from warden.config import Paths
from warden.vmm.channel_keys import ChannelKeys, forget_vm


def test_a_vm_secret_is_root_only_and_forgotten_with_the_vm(tmp_path: Path) -> None:
    keys = ChannelKeys(Paths(tmp_path))
    secret = keys.create("a1b2c3")
    assert len(secret) == 32 and keys.current("a1b2c3") == secret
    path = keys.store.path("vm/a1b2c3")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.create("d4e5f6") != secret  # every VM its own
    keys.forget("a1b2c3")
    assert keys.current("a1b2c3") is None and not path.exists()


def test_a_rekey_keeps_the_held_secret_until_it_ends(tmp_path: Path) -> None:
    keys = ChannelKeys(Paths(tmp_path))
    held = keys.create("vm1")
    new = keys.begin_rekey("vm1", held)
    assert new != held
    # A manager killed here finds both: the new one, and the one the guest may still hold.
    assert keys.current("vm1") == new and keys.previous("vm1") == held
    keys.end_rekey("vm1")
    assert keys.previous("vm1") is None and keys.current("vm1") == new
    chosen = bytes(32)
    assert keys.begin_rekey("vm1", new, chosen) == chosen == keys.current("vm1")


def test_template_secrets_and_forgetting_by_path(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    keys = ChannelKeys(paths)
    keys.save_template("_boot-default-256m-1c", bytes(range(32)))
    assert keys.template("_boot-default-256m-1c") == bytes(range(32))
    keys.forget_template("_boot-default-256m-1c")
    assert keys.template("_boot-default-256m-1c") is None
    keys.create("vm2")
    forget_vm(paths, "vm2")
    assert keys.current("vm2") is None
    forget_vm(paths, "Not.A.VM.id")  # no such key can exist: nothing to do, no error
