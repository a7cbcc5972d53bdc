"""The sync SDK: the same names and shapes as the async one, run through the portal loop.

Nothing here re-implements behaviour: every method hands its async twin to the portal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Literal, Unpack, overload

from warden.agent.client import DEFAULT_MAX_OUTPUT
from warden.sdk import _portal
from warden.sdk._async import (
    DEFAULT_MAX_READ,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    FileData,
)
from warden.sdk._create import CreateOptions
from warden.sdk._download import DEFAULT_MAX_DOWNLOAD
from warden.sdk._types import CommandResult, EntryInfo
from warden.vmm.spec import VMSpec
from warden.wire.ops import DEFAULT_USER

SyncOutputHandler = Callable[[str], None]


class Sandbox:
    """A running microVM. Make one with ``Sandbox.create(...)``, ideally in a ``with``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        """Wrap an async sandbox. Use :meth:`create` instead."""
        self._inner = inner
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)

    @classmethod
    def create(cls, image: str = "default", **options: Unpack[CreateOptions]) -> Sandbox:
        """Boot a sandbox and wait until its agent answers (at most ``timeout`` seconds);
        the options are :meth:`AsyncSandbox.create`'s
        (:class:`~warden.sdk._create.CreateOptions`)."""
        return cls(_portal.call(AsyncSandbox.create(image, **options)))

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def spec(self) -> VMSpec:
        return self._inner.spec

    @property
    def state(self) -> str:
        return self._inner.state

    @property
    def is_running(self) -> bool:
        return self._inner.is_running

    @property
    def console_log(self) -> str:
        return self._inner.console_log

    def info(self) -> dict[str, object]:
        return _portal.call(self._inner.info())

    def ping(self) -> float:
        return _portal.call(self._inner.ping())

    def save_template(self, name: str) -> None:
        """Save this sandbox as template ``name``; see :meth:`AsyncSandbox.save_template`."""
        _portal.call(self._inner.save_template(name))

    def fork(self, n: int = 1) -> list[Sandbox]:
        """Start ``n`` children of this sandbox; see :meth:`AsyncSandbox.fork`."""
        return [Sandbox(child) for child in _portal.call(self._inner.fork(n))]

    def pause(self) -> None:
        """Save the VM to disk and end its QEMU; see :meth:`AsyncSandbox.pause`."""
        _portal.call(self._inner.pause())

    @classmethod
    def resume(cls, sandbox_id: str) -> Sandbox:
        """Start a paused sandbox again; see :meth:`AsyncSandbox.resume`."""
        return cls(_portal.call(AsyncSandbox.resume(sandbox_id)))

    def kill(self) -> None:
        """Destroy the VM now. Nothing is left behind. Safe to call twice."""
        _portal.call(self._inner.kill())

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class Commands:
    """Run commands in the sandbox. Output handlers run on warden's portal thread."""

    def __init__(self, inner: AsyncCommands) -> None:
        self._inner = inner

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = 60.0,
        on_stdout: SyncOutputHandler | None = None,
        on_stderr: SyncOutputHandler | None = None,
        user: str = DEFAULT_USER,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """See :meth:`AsyncCommands.run`."""
        return _portal.call(
            self._inner.run(
                cmd,
                env=env,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                user=user,
                max_output=max_output,
            )
        )


class Files:
    """Move files in and out of the sandbox. Data is streamed in chunks. See
    :class:`~warden.sdk._async.AsyncFiles` for ``user`` and ``max_size``."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._inner = inner

    def write(
        self, path: str, data: FileData, *, mode: int = 0o644, user: str = DEFAULT_USER
    ) -> int:
        return _portal.call(self._inner.write(path, data, mode=mode, user=user))

    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        user: str = ...,
        max_size: int | None = ...,
    ) -> str: ...
    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        user: str = ...,
        max_size: int | None = ...,
    ) -> bytes: ...

    def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        user: str = DEFAULT_USER,
        max_size: int | None = DEFAULT_MAX_READ,
    ) -> str | bytes:
        """See :meth:`AsyncFiles.read`."""
        if format == "bytes":
            return _portal.call(
                self._inner.read(path, format="bytes", user=user, max_size=max_size)
            )
        return _portal.call(self._inner.read(path, format="text", user=user, max_size=max_size))

    def stream(
        self, path: str, *, user: str = DEFAULT_USER, max_size: int | None = None
    ) -> Iterator[bytes]:
        """See :meth:`AsyncFiles.stream`."""
        return _portal.iterate(self._inner.stream(path, user=user, max_size=max_size))

    def download(
        self,
        path: str,
        dest: str | os.PathLike[str],
        *,
        user: str = DEFAULT_USER,
        max_size: int | None = DEFAULT_MAX_DOWNLOAD,
    ) -> int:
        """See :meth:`AsyncFiles.download`. Ctrl-C cancels it and leaves no file."""
        return _portal.call(self._inner.download(path, dest, user=user, max_size=max_size))

    def list(self, path: str, *, user: str = DEFAULT_USER) -> list[EntryInfo]:
        return _portal.call(self._inner.list(path, user=user))

    def stat(self, path: str, *, user: str = DEFAULT_USER) -> EntryInfo:
        return _portal.call(self._inner.stat(path, user=user))

    def exists(self, path: str, *, user: str = DEFAULT_USER) -> bool:
        return _portal.call(self._inner.exists(path, user=user))

    def remove(self, path: str, *, recursive: bool = False, user: str = DEFAULT_USER) -> None:
        _portal.call(self._inner.remove(path, recursive=recursive, user=user))

    def make_dir(self, path: str, *, mode: int = 0o755, user: str = DEFAULT_USER) -> None:
        _portal.call(self._inner.make_dir(path, mode=mode, user=user))
