"""Each VM's channel secret: made at launch, kept for reattaching, replaced after a capture.

The secrets live in the key store (``warden.seal.keys``: 0600 files, root only)::

    keys/vm/<id>.key        the VM's current secret: a new manager reattaches with it
    keys/vm/<id>-prev.key   during a re-key only: the secret the guest may still hold
    keys/template/<name>.key the secret inside a template's guest memory
    keys/boot-template/<h>.key the same for an automatic boot template (h: its name's hash)

A VM gets a fresh secret at launch. QEMU passes it to the guest through fw_cfg, from a 0600
file in the VM's runtime dir (``RuntimeFiles.channel_key``) that is removed once the guest has
read it. A clone starts with its template's secret in its memory, as does every sibling
cloned from it, so the host's first session with it (authenticated by that secret) hands it
its own (:meth:`ChannelKeys.begin_rekey`); so does the VM a template (or a fork, or a pause)
was just taken of. The new secret is stored before it is sent and the old one kept as
``-prev`` until the guest took it, so a manager killed in between still finds the one that
works.
"""

from __future__ import annotations

import hashlib
import os

from warden.config import Paths
from warden.seal.keys import KEY_BYTES, NAME_RE, KeyStore

__all__ = ["ChannelKeys"]


class ChannelKeys:
    """The channel secrets of VMs and templates, in the key store of ``paths``."""

    def __init__(self, paths: Paths) -> None:
        self.store = KeyStore(paths)

    def create(self, vm_id: str) -> bytes:
        """A new secret for a new VM, stored as its current one."""
        secret = os.urandom(KEY_BYTES)
        self.store.put(f"vm/{vm_id}", secret)
        return secret

    def current(self, vm_id: str) -> bytes | None:
        return self.store.get(f"vm/{vm_id}")

    def previous(self, vm_id: str) -> bytes | None:
        """The secret the guest held before an unfinished re-key, if there was one."""
        return self.store.get(f"vm/{vm_id}-prev")

    def begin_rekey(self, vm_id: str, held: bytes, new: bytes | None = None) -> bytes:
        """Store ``new`` (a fresh secret if None) as the current secret of the VM whose guest
        holds ``held``, keeping ``held`` until :meth:`end_rekey`; return the new one."""
        self.store.put(f"vm/{vm_id}-prev", held)
        if new is None:
            return self.create(vm_id)
        self.store.put(f"vm/{vm_id}", new)
        return new

    def end_rekey(self, vm_id: str) -> None:
        """The guest took its new secret: forget the old one."""
        self.store.delete(f"vm/{vm_id}-prev")

    def forget(self, vm_id: str) -> None:
        """The VM is gone."""
        self.store.delete(f"vm/{vm_id}-prev")
        self.store.delete(f"vm/{vm_id}")

    def save_template(self, name: str, secret: bytes) -> None:
        self.store.put(_template_key(name), secret)

    def template(self, name: str) -> bytes | None:
        """The secret inside template ``name``'s guest memory (each clone is re-keyed)."""
        return self.store.get(_template_key(name))

    def forget_template(self, name: str) -> None:
        self.store.delete(_template_key(name))


def _template_key(name: str) -> str:
    """The key-store name of template ``name``'s secret. An automatic boot template's name
    (``_boot-<image>-...``: a leading '_', maybe dots) is no key name: it is hashed."""
    if name.startswith("_"):
        return f"boot-template/{hashlib.sha256(name.encode()).hexdigest()[:32]}"
    return f"template/{name}"


def forget_vm(paths: Paths, vm_id: str) -> None:
    """Delete the secrets of a VM that is gone (for callers without a Machine)."""
    if NAME_RE.match(f"vm/{vm_id}-prev"):  # else not a VM id of ours: it has no secret
        ChannelKeys(paths).forget(vm_id)
