"""What a sandbox needs from where its VM lives: a local Machine, or the manager daemon.

``AsyncSandbox`` talks only to these two protocols, so the embedded engine
(:class:`warden.vmm.machine.Machine` with :class:`warden.agent.client.AgentClient`) and the
remote backend (``_remote.RemoteMachine`` with ``RemoteAgent``) serve one implementation of the
public API. mypy checks that both backends fit.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from warden.agent.client import EntryInfo, ExecResult, OutputCallback
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState
from warden.wire.ops import DEFAULT_USER


class AgentBackend(Protocol):
    async def exec(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | AsyncIterable[bytes] | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        user: str = DEFAULT_USER,
        max_output: int = ...,
    ) -> ExecResult: ...

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        parents: bool = True,
        user: str = DEFAULT_USER,
    ) -> int: ...

    def read_file(self, path: str, *, user: str = DEFAULT_USER) -> AsyncIterator[bytes]: ...

    async def list_dir(self, path: str, *, user: str = DEFAULT_USER) -> list[EntryInfo]: ...

    async def stat(self, path: str, *, user: str = DEFAULT_USER) -> EntryInfo: ...

    async def remove(
        self, path: str, *, recursive: bool = False, user: str = DEFAULT_USER
    ) -> None: ...

    async def make_dir(
        self, path: str, *, parents: bool = True, mode: int = 0o755, user: str = DEFAULT_USER
    ) -> None: ...

    async def info(self) -> dict[str, object]: ...

    async def ping(self) -> float: ...


class MachineBackend(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def spec(self) -> VMSpec: ...

    @property
    def state(self) -> VMState: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def agent(self) -> AgentBackend: ...

    def console_tail(self, lines: int = ...) -> str: ...

    async def shutdown(self) -> None: ...

    async def save_template(
        self, name: str, *, keep_running: bool, extra: dict[str, Any] | None = None
    ) -> None: ...

    async def fork(self, n: int = ...) -> Sequence[MachineBackend]: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...
