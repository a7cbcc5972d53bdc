"""``warden run`` as the ``warden`` script runs it, with the time spent in the VM recorded.

Run as a new process by ``bench/run.py --only cli``: ``python bench/cli_probe.py ARGS...`` is
``warden run ARGS...``, except that on exit it prints one JSON line to stderr with the seconds
since this interpreter began running this file, of:

* ``vm``: from the start of QEMU's spawn (``Machine._spawn``) to the guest agent's first answer
  (the end of ``Machine._connect``), plus the command's exec round trip
  (``AgentClient.exec``), plus the VM's shutdown (``Machine.shutdown``: QMP quit, QEMU's exit),
  minus any wait for the template's RAM (``LoadedTemplate.ram_verified``: its copy runs while
  QEMU starts, and what QEMU's start-up does not hide of it is warden's own time);
* ``end``: when the process is about to exit.

Everything else is warden's own code outside the VM: interpreter start-up, imports, argument
parsing, looking for a daemon, the image's (cached) verification, the snapshot's seal check,
the runtime files, and the teardown. The benchmark takes it as the process's wall time (timed
by the parent) minus ``vm``. The patches wrap methods only; they import nothing that
``warden run`` would not.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

T0 = time.perf_counter()
spans: dict[str, list[float]] = {}


def _timed(cls: type, name: str) -> None:
    orig: Callable[..., Coroutine[Any, Any, Any]] = getattr(cls, name)

    async def wrapper(self: object, *args: object, **kwargs: object) -> Any:
        t = time.perf_counter()
        try:
            return await orig(self, *args, **kwargs)
        finally:
            spans.setdefault(name, []).extend((t - T0, time.perf_counter() - T0))

    setattr(cls, name, wrapper)


def _report() -> None:
    first = spans.get("_spawn", [0.0])[0]
    boot = spans.get("_connect", [first, first])[-1] - first
    vm = boot + sum(s[1] - s[0] for s in (spans.get("exec", [0, 0]), spans.get("shutdown", [0, 0])))
    ram = spans.get("ram_verified", [0, 0])
    vm -= sum(ram[1::2]) - sum(ram[0::2])
    end = time.perf_counter() - T0
    waited = sum(ram[1::2]) - sum(ram[0::2])
    print(json.dumps({"vm": vm, "boot": boot, "end": end, "ram_wait": waited}), file=sys.stderr)


def main() -> None:
    from warden.agent.client import AgentClient
    from warden.cli.main import main as warden_main
    from warden.vmm.machine import Machine
    from warden.vmm.templates import LoadedTemplate

    for name in ("_spawn", "_connect", "shutdown"):
        _timed(Machine, name)
    _timed(AgentClient, "exec")
    _timed(LoadedTemplate, "ram_verified")
    atexit.register(_report)
    sys.argv = ["warden", "run", *sys.argv[1:]]
    warden_main()


if __name__ == "__main__":
    main()
