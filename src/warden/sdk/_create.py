"""The options of ``create()``, declared once.

Five functions create a sandbox: ``Sandbox.create``, ``AsyncSandbox.create`` (embedded), the
same two of a daemon's :class:`~warden.sdk._remote.Client` (``client.Sandbox.create``,
``client.AsyncSandbox.create``) and ``client.create``. Each takes ``image`` and then
``**options: Unpack[CreateOptions]``: the names, types and meaning of the options live only
in :class:`CreateOptions`, and their defaults only in :class:`Create`, so a new option is
added once (``tests/unit/test_public_api.py`` checks that every factory takes exactly these).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from warden.vmm.spec import VMSpec

__all__ = ["Create", "CreateOptions"]


class CreateOptions(TypedDict, total=False):
    """The options of every ``create(image="default", **options)``.

    - ``memory_mib`` (256), ``vcpus`` (1): the guest's size.
    - ``name``: unique among a daemon's sandboxes; ``None`` for none.
    - ``env``: environment of every command; ``labels``: free-form ``k=v`` metadata.
    - ``accel`` (``"auto"``): ``kvm`` where a probe boot proves it works, else ``tcg``.
    - ``timeout`` (60.0): seconds to wait for the guest's agent to answer.
    - ``boot`` (``"snapshot"``): clone the automatic template of this shape (image, memory,
      vCPUs) when there is one, and save it after a cold boot; ``"cold"`` always boots from
      scratch (and makes none).
    - ``require_jail`` (False): refuse to start (``JailUnavailableError``, nothing started)
      unless QEMU gets every jail feature of the host (``warden doctor`` lists them).
    - ``template``: clone this template (``save_template``, ``warden template create``): the
      clone starts from its state, shares its memory copy-on-write, and has its image, memory
      and vCPUs (leave those unset). ``TemplateNotFoundError`` if there is none,
      ``TemplateRefusedError`` if its seal or machine no longer matches (make it again).

    A daemon chooses ``accel`` itself: through a client, only its default is accepted.
    """

    memory_mib: int
    vcpus: int
    name: str | None
    env: dict[str, str] | None
    labels: dict[str, str] | None
    accel: str
    timeout: float
    boot: str
    require_jail: bool
    template: str | None


@dataclass(frozen=True)
class Create:
    """A ``create()`` call with its defaults filled in."""

    image: str = "default"
    memory_mib: int = 256
    vcpus: int = 1
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    accel: str = "auto"
    timeout: float = 60.0
    boot: str = "snapshot"
    require_jail: bool = False
    template: str | None = None

    @classmethod
    def of(cls, image: str, options: CreateOptions) -> Create:
        """The call ``create(image, **options)``; an unknown option is a ``TypeError``, as it
        is for any Python function."""
        unknown = sorted(set(options) - set(CreateOptions.__annotations__))
        if unknown:
            known = ", ".join(CreateOptions.__annotations__)
            raise TypeError(
                f"create() got an unexpected keyword argument {unknown[0]!r} "
                f"(its options: image, {known})"
            )
        given = dict(options)
        given["env"] = options.get("env") or {}
        given["labels"] = options.get("labels") or {}
        return cls(image=image, **given)  # type: ignore[arg-type]

    def spec(self, *, check_host: bool = True) -> VMSpec:
        """The VM spec, checked (``SpecError`` naming each bad option)."""
        return VMSpec.parse(
            check_host=check_host,
            image=self.image,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            name=self.name,
            env=self.env,
            labels=self.labels,
            accel=self.accel,
            agent_timeout_s=self.timeout,
            boot=self.boot,
            template=self.template,
        )
