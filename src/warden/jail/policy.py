"""Whether VMs are jailed: ``off``, ``on`` or ``require``.

* ``on``: every QEMU gets every jail feature this host has; a missing one is a downgrade,
  logged (WARNING) for every VM it affects and listed by ``warden doctor``.
* ``require`` (``--require-jail``, ``Sandbox.create(require_jail=True)``, a create request's
  ``require_jail``): a missing feature refuses the launch with :class:`JailUnavailableError`,
  which names what is missing, before anything is made (no QEMU, uid claim, mount or runtime
  dir).
* ``off``: QEMU runs as root, as before the jail (the accelerator probe's way).

The process-wide default (:func:`set_default_mode`) is what ``Machine`` uses unless told
otherwise (``Machine(jail=...)``: the SDK's ``require_jail`` asks for ``require`` for one VM);
``warden run``/``serve --require-jail`` set it; embedders may call it too.
"""

from __future__ import annotations

from typing import Literal, get_args

from warden._errors import JailUnavailableError

__all__ = ["MODES", "JailMode", "JailUnavailableError", "default_mode", "set_default_mode"]

JailMode = Literal["off", "on", "require"]
MODES: tuple[JailMode, ...] = get_args(JailMode)

_default: JailMode = "on"


def default_mode() -> JailMode:
    return _default


def set_default_mode(mode: JailMode) -> None:
    """Set the jail mode of every VM this process launches from now on."""
    global _default  # noqa: PLW0603 (one process-wide setting, like logging's level)
    if mode not in MODES:
        raise ValueError(f"the jail mode is one of {', '.join(MODES)}, not {mode!r}")
    _default = mode
