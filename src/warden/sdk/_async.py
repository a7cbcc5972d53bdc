"""The async SDK: ``AsyncSandbox.create()``, ``sbx.commands.run()``, ``sbx.files.*``."""

from __future__ import annotations

import codecs
import contextlib
import inspect
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import IO, Any, Literal, Unpack, overload

from warden._errors import GuestFileError, SandboxClosedError, SpecError, VMNotFoundError
from warden.agent.client import DEFAULT_MAX_OUTPUT
from warden.config import Paths
from warden.sdk import _download
from warden.sdk._backend import AgentBackend, MachineBackend
from warden.sdk._create import Create, CreateOptions
from warden.sdk._links import AsyncLinks
from warden.sdk._types import CommandResult, EntryInfo
from warden.vmm.machine import Machine
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState
from warden.wire.ops import DEFAULT_USER

CHUNK = 1024 * 1024
"""How much of a file object is read per step (one transfer-window slot)."""
DEFAULT_MAX_READ = 64 * 1024 * 1024
"""The default ``max_size`` of ``files.read``, which holds the whole file in memory."""

OutputHandler = Callable[[str], Awaitable[None] | None]

_paused: dict[str, AsyncSandbox] = {}
"""Embedded sandboxes this process paused, by id, for ``AsyncSandbox.resume(id)``."""
FileData = bytes | str | IO[bytes] | AsyncIterable[bytes]


class AsyncSandbox:
    """A running microVM. Make one with ``await AsyncSandbox.create(...)``."""

    def __init__(self, machine: MachineBackend) -> None:
        """Wrap a launched machine (local or remote). Use :meth:`create` instead."""
        self._machine = machine
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.links = AsyncLinks(self)
        """VM-to-VM links (a daemon's sandboxes only; ``warden.sdk._links``)."""

    @classmethod
    async def create(cls, image: str = "default", **options: Unpack[CreateOptions]) -> AsyncSandbox:
        """Boot a sandbox and wait until its agent answers (at most ``timeout`` seconds).

        The options (:class:`~warden.sdk._create.CreateOptions`): ``memory_mib``, ``vcpus``,
        ``name``, ``env``, ``labels``, ``accel``, ``timeout``, ``boot`` (``"snapshot"``: a clone
        of its shape's boot template, or ``"cold"`` to boot from scratch), ``require_jail``
        (refuse to start, raising ``JailUnavailableError``, unless QEMU gets every jail feature
        of the host) and ``template`` (clone that template: it shares the template's memory
        copy-on-write and has its image, memory and vCPUs; ``TemplateNotFoundError``, or
        ``TemplateRefusedError`` if its seal or machine no longer matches).
        """
        call = Create.of(image, options)
        machine = Machine(
            call.spec(), paths=Paths.from_env(), jail="require" if call.require_jail else None
        )
        await machine.launch()
        return cls(machine)

    @property
    def id(self) -> str:
        return self._machine.id

    @property
    def spec(self) -> VMSpec:
        return self._machine.spec

    @property
    def state(self) -> str:
        return self._machine.state.value

    @property
    def is_running(self) -> bool:
        return self._machine.state is VMState.RUNNING

    @property
    def console_log(self) -> str:
        """The tail of the guest's serial console."""
        return self._machine.console_tail()

    async def info(self) -> dict[str, object]:
        """Kernel, uptime and memory, as the guest sees them."""
        return await self._agent().info()

    async def ping(self) -> float:
        """Round trip time to the guest agent, in seconds."""
        return await self._agent().ping()

    async def save_template(self, name: str) -> None:
        """Save this sandbox, as it is now, as template ``name``; it keeps running.

        The sandbox is paused while its device state and memory are saved (about a second
        for 256 MiB here); it is refused (``StateTransitionError``) while commands or file
        transfers are in flight. ``create(template=name)`` then makes clones of it.
        ``NameConflictError`` if the name is taken. A sandbox that is itself a clone (the
        default: of its shape's boot template) is saved through a short-lived helper VM, so
        that the template's clones still share its memory (about a second more).
        """
        self._agent()  # a closed or dead sandbox says so
        await self._machine.save_template(name, keep_running=True, extra={"source": self.id})

    async def fork(self, n: int = 1) -> list[AsyncSandbox]:
        """Start ``n`` children of this sandbox (1 to 16) that carry on from its state, files
        and processes included, and share its memory copy-on-write; it keeps running.

        It is paused while its memory is copied (about 0.2 s for 256 MiB here); commands in
        flight refuse the fork (``StateTransitionError``). Each child is a new sandbox (its
        own id, hostname, keys and RNG seed); kill each when done. A clone (the default
        sandbox) is forked too, but slower, and its children share less: QEMU migrates its
        private RAM with the device state. On a daemon, each child is admitted like a create
        (``AdmissionError``: none starts).
        """
        self._agent()  # a closed or dead sandbox says so
        return [AsyncSandbox(child) for child in await self._machine.fork(n)]

    async def pause(self) -> None:
        """Save the VM's memory and files to disk, sealed, and end its QEMU (its RAM is
        freed). ``AsyncSandbox.resume(sbx.id)`` (or ``sbx.resume()``) starts it again where it
        was, processes included. Refused (StateTransitionError) unless it is running with
        no command or transfer in flight.

        An embedded sandbox can be resumed by the process that paused it; a daemon's by any
        client, after a daemon restart too."""
        await self._machine.pause()
        _paused[self.id] = self

    @classmethod
    async def resume(cls, sandbox_id: str) -> AsyncSandbox:
        """Start a paused sandbox again from its saved state, checked against its seal
        (``PausedStateError`` if it was altered: it is not loaded)."""
        sandbox = _paused.get(sandbox_id)
        if sandbox is None:
            raise VMNotFoundError(
                f"no sandbox {sandbox_id!r} was paused by this process (an embedded sandbox "
                "is resumed by the process that paused it; a daemon's with "
                "`client.Sandbox.resume(id)`)"
            )
        await sandbox._machine.resume()
        _paused.pop(sandbox_id, None)
        return sandbox

    async def kill(self) -> None:
        """Destroy the VM now. Nothing is left behind. Safe to call twice."""
        _paused.pop(self.id, None)
        await self._machine.shutdown()

    async def close(self) -> None:
        await self.kill()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    def _agent(self) -> AgentBackend:
        machine = self._machine
        if machine.state is not VMState.RUNNING:
            detail = ""
            if machine.state is VMState.FAILED:
                detail = (
                    f" (its QEMU exited with code {machine.exit_code}; console tail:\n"
                    f"{machine.console_tail() or '(empty)'})"
                )
            if machine.state is VMState.PAUSED:
                raise SandboxClosedError(
                    f"sandbox {self.id} is paused; resume it first with Sandbox.resume(id)"
                )
            raise SandboxClosedError(
                f"sandbox {self.id} is {machine.state.value}{detail}; create a new one with "
                "Sandbox.create()"
            )
        return self._machine.agent


class AsyncCommands:
    """Run commands in the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sbx = sandbox

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = 60.0,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        user: str = DEFAULT_USER,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """Run ``cmd`` (a shell string, or an argv list run without a shell) and wait for it.

        ``timeout`` (seconds, None for none) kills the command and raises CommandTimeoutError.
        ``on_stdout``/``on_stderr`` get decoded output as it arrives: all of it, in constant
        memory; a slow handler slows the command's output down instead of buffering it.
        ``user`` is the guest user that runs it: ``"user"`` (uid 1000, home /home/user, the
        default cwd) or ``"root"`` (a daemon allows root only to a caller its access policy
        grants ``exec-as-root``: PermissionDeniedError otherwise).
        ``max_output`` caps the bytes of stdout and of stderr (each) kept in the result
        (default 16 MiB; 0 keeps none); ``result.truncated`` says whether output was cut.
        """
        if max_output < 0:
            raise SpecError(f"max_output must be 0 or more bytes, not {max_output}")
        merged = {**self._sbx.spec.env, **(env or {})}
        command: str | list[str] = cmd if isinstance(cmd, str) else list(cmd)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        res = await self._sbx._agent().exec(
            command,
            env=merged,
            cwd=cwd,
            stdin=data,
            timeout=timeout,
            on_stdout=_decoding(on_stdout),
            on_stderr=_decoding(on_stderr),
            user=user,
            max_output=max_output,
        )
        sig = res.signal
        code = res.exit_code if res.exit_code is not None else 128 + (sig or 0)
        return CommandResult(
            stdout=res.stdout.decode(errors="replace"),
            stderr=res.stderr.decode(errors="replace"),
            exit_code=code,
            signal=sig,
            stdout_bytes=res.stdout,
            stderr_bytes=res.stderr,
            truncated=res.truncated,
        )


def _decoding(handler: OutputHandler | None) -> Callable[[bytes], Any] | None:
    """Turn a str handler into a bytes handler that decodes UTF-8 across chunk boundaries."""
    if handler is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def on_bytes(chunk: bytes) -> None:
        text = decoder.decode(chunk)
        if text:
            result = handler(text)
            if inspect.isawaitable(result):
                await result

    return on_bytes


class AsyncFiles:
    """Move files in and out of the sandbox. Data is streamed in chunks.

    Every method takes ``user``: the guest user whose permissions apply, ``"user"`` (the
    default, uid 1000) or ``"root"``. What comes out of the guest is bounded by ``max_size``
    (bytes; None for no limit): past it, :class:`~warden.SizeLimitError`.
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sbx = sandbox

    async def write(
        self, path: str, data: FileData, *, mode: int = 0o644, user: str = DEFAULT_USER
    ) -> int:
        """Write ``data`` (bytes, str, a binary file object or an async iterable) to ``path``.

        Parent directories are made. Returns the number of bytes written.
        """
        payload: bytes | AsyncIterable[bytes]
        if isinstance(data, str):
            payload = data.encode()
        elif isinstance(data, bytes):
            payload = data
        elif isinstance(data, bytearray | memoryview):
            payload = bytes(data)
        elif isinstance(data, AsyncIterable):
            payload = data
        else:
            payload = _read_chunks(data)
        agent = self._sbx._agent()
        return await agent.write_file(path, payload, mode=mode, parents=True, user=user)

    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        user: str = ...,
        max_size: int | None = ...,
    ) -> str: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        user: str = ...,
        max_size: int | None = ...,
    ) -> bytes: ...

    async def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        user: str = DEFAULT_USER,
        max_size: int | None = DEFAULT_MAX_READ,
    ) -> str | bytes:
        """Read a whole file, as text (UTF-8) or bytes; at most ``max_size`` bytes (64 MiB by
        default). Use :meth:`stream` or :meth:`download` for large files."""
        parts = [chunk async for chunk in self.stream(path, user=user, max_size=max_size)]
        raw = b"".join(parts)
        return raw if format == "bytes" else raw.decode(errors="replace")

    def stream(
        self, path: str, *, user: str = DEFAULT_USER, max_size: int | None = None
    ) -> AsyncIterator[bytes]:
        """Read a file chunk by chunk, in constant memory; stop early to cancel the read."""
        chunks = self._sbx._agent().read_file(path, user=user)
        return _download.bounded(chunks, path, _limit(max_size))

    async def download(
        self,
        path: str,
        dest: str | os.PathLike[str],
        *,
        user: str = DEFAULT_USER,
        max_size: int | None = _download.DEFAULT_MAX_DOWNLOAD,
    ) -> int:
        """Copy ``path`` out of the sandbox to the local file ``dest``; returns its size.

        At most ``max_size`` bytes (1 GiB by default): a larger file is refused before it is
        sent when its size says so, and cut off when it grows. Zero runs become holes, so a
        sparse file stays sparse. ``dest`` appears only once complete: on any error or
        cancellation nothing is left. The file is made with mode 0600.
        """
        limit = _limit(max_size)
        if limit is not None:
            with contextlib.suppress(GuestFileError):  # e.g. no stat endpoint: checked as sent
                size = (await self.stat(path, user=user)).size
                if size > limit:
                    raise _download.too_large(path, size, limit)
        chunks = self._sbx._agent().read_file(path, user=user)
        return await _download.download(chunks, path, os.fspath(dest), limit)

    async def list(self, path: str, *, user: str = DEFAULT_USER) -> list[EntryInfo]:
        return await self._sbx._agent().list_dir(path, user=user)

    async def stat(self, path: str, *, user: str = DEFAULT_USER) -> EntryInfo:
        return await self._sbx._agent().stat(path, user=user)

    async def exists(self, path: str, *, user: str = DEFAULT_USER) -> bool:
        try:
            await self.stat(path, user=user)
        except GuestFileError as exc:
            if exc.errno == 2:
                return False
            raise
        return True

    async def remove(self, path: str, *, recursive: bool = False, user: str = DEFAULT_USER) -> None:
        await self._sbx._agent().remove(path, recursive=recursive, user=user)

    async def make_dir(self, path: str, *, mode: int = 0o755, user: str = DEFAULT_USER) -> None:
        """Make ``path`` and its parents. Succeeds if it exists already."""
        await self._sbx._agent().make_dir(path, parents=True, mode=mode, user=user)


def _limit(max_size: int | None) -> int | None:
    if max_size is not None and max_size < 0:
        raise SpecError(f"max_size must be 0 or more bytes (or None), not {max_size}")
    return max_size


async def _read_chunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    import asyncio

    while chunk := await asyncio.to_thread(f.read, CHUNK):
        yield chunk
