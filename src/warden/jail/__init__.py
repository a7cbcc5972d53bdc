"""The jail around every QEMU, after Firecracker's jailer (docs/security.md, "The jail").

* :mod:`warden.jail.ids`: each VM's own uid and gid, claimed from a range warden owns.
* :mod:`warden.jail.features`: which jail features this host has (``warden doctor``), cached.
* :mod:`warden.jail.policy`: off, on (use what the host has; a missing feature is a logged
  downgrade) or require (a missing feature refuses the launch).
* :mod:`warden.jail.files`: what QEMU needs in its root (binary, libraries, firmware).
* :mod:`warden.jail.spawn`: the host side of a jailed launch: the fds QEMU gets, the status
  pipe, and the process to track.
* ``launcher.py``: the inside: namespaces are made by ``unshare``, the rest there.

This package's ``__init__`` imports nothing: the janitor imports :mod:`warden.jail.ids`.
"""
