"""Remote mode: the SDK against a manager daemon (``warden serve``) over its REST API.

``warden.connect(url)`` returns a :class:`Client`. ``client.Sandbox.create(...)`` and
``await client.AsyncSandbox.create(...)`` give the very same ``Sandbox``/``AsyncSandbox``
classes as embedded mode: only what stands behind them differs. Embedded, an ``AsyncSandbox``
wraps a :class:`~warden.vmm.machine.Machine` and its agent client; remote, it wraps a
:class:`RemoteMachine` whose ``agent`` is a :class:`RemoteAgent` with the same methods, each one
an HTTP request to the daemon. So the public API has one implementation, and the sync API still
only hands its async twin to the portal loop.

Operations a daemon that predates them has no endpoint for (guest ``info`` and ``ping``, the
file ``list``/``stat``/``remove``/``make_dir``) raise :class:`RemoteUnsupportedError` instead of
being emulated by commands in the guest.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn, Unpack, cast

import httpx

from warden._errors import (
    AgentError,
    CommandTimeoutError,
    HostError,
    PausedStateError,
    SandboxClosedError,
    SpecError,
    StateTransitionError,
    VMNotFoundError,
    WardenError,
)
from warden.agent.client import DEFAULT_MAX_OUTPUT, EntryInfo, ExecResult, OutputCallback
from warden.api import errors as api_errors
from warden.records import Kind
from warden.sdk._async import AsyncSandbox
from warden.sdk._create import Create, CreateOptions
from warden.sdk._endpoint import Endpoint
from warden.sdk._lines import RecordPool
from warden.sdk._sync import Sandbox
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState
from warden.wire.ops import DEFAULT_USER

API = "/v1"
CONNECT_TIMEOUT_S = 10.0
LIFECYCLE_TIMEOUT_S = 300.0
"""A stop, pause, resume or fork may save or load a VM's memory: minutes under load."""
PROBE_TIMEOUT_S = 2.0


class RemoteUnsupportedError(WardenError, NotImplementedError):
    """The daemon's API has no endpoint for this operation (yet); use embedded mode for it."""


def daemon_answers(url: str | None = None, *, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a warden daemon answers at ``url`` (default: :func:`default_url`)."""
    endpoint = Endpoint.resolve(url)
    uds = endpoint.socket_path
    if uds is not None and not os.path.exists(uds):
        return False
    try:
        with endpoint.sync_client(timeout) as c:
            return c.get(f"{API}/info").status_code == 200
    except httpx.HTTPError:
        return False


def _raise(response: httpx.Response, *, vm_id: str | None = None) -> NoReturn:
    """Raise the error a daemon's answer names (``api/errors.py``), as embedded mode would.

    For an operation on sandbox ``vm_id``, a sandbox that is gone (404) or cannot be used
    (stopped, paused, unhealthy: 409) is a :class:`SandboxClosedError`, as it is embedded.
    """
    answer = api_errors.parse(response.status_code, response.content)
    exc = api_errors.to_exception(answer)
    if vm_id is not None and isinstance(exc, VMNotFoundError):
        raise SandboxClosedError(f"sandbox {vm_id} no longer exists on the daemon: {exc}")
    if vm_id is not None and isinstance(exc, StateTransitionError | PausedStateError):
        raise SandboxClosedError(f"sandbox {vm_id} cannot be used: {exc}")
    raise exc


READ_CHUNK = 256 * 1024
"""Bytes of a downloaded file taken from the connection per step."""
MAX_ERROR_BODY = 1 << 20
"""The most of an error answer that is read."""

INLINE_STDIN_MAX = 64 * 1024
"""Bytes of stdin sent inline (base64 in the exec request); more, or a stream, is streamed."""


def _exec_body(
    cmd: list[str] | str,
    user: str,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: bytes | AsyncIterable[bytes] | None,
) -> tuple[dict[str, Any], bytes | AsyncIterable[bytes] | None]:
    """The exec request's JSON body, and the stdin left to stream on a second request (small
    ``bytes`` go inline in the body)."""
    body: dict[str, Any] = {"cmd": cmd if isinstance(cmd, str) else list(cmd), "user": user}
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout"] = timeout
    if isinstance(stdin, bytes) and len(stdin) <= INLINE_STDIN_MAX:
        body["stdin"] = base64.b64encode(stdin).decode()
        stdin = None
    elif stdin is not None:
        body["stdin_stream"] = True
    return body, stdin


class _StdinFeeder:
    """Streams a remote command's stdin (if it has a stream) once the daemon named it."""

    def __init__(
        self,
        send: Callable[[str, bytes | AsyncIterable[bytes]], Coroutine[Any, Any, None]],
        stdin: bytes | AsyncIterable[bytes] | None,
    ) -> None:
        self._send = send
        self._stdin = stdin
        self._task: asyncio.Task[None] | None = None

    def start(self, exec_id: object) -> None:
        """Start streaming to the command ``exec_id``: only once, and only with a stream."""
        if self._stdin is not None and self._task is None:
            self._task = asyncio.create_task(self._send(str(exec_id), self._stdin))

    async def stop(self) -> None:
        """Cancel the stream if it is still running."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def raise_failure(self) -> None:
        """Raise what made the stream fail, if it did."""
        task = self._task
        if task is not None and not task.cancelled() and task.exception() is not None:
            raise cast(BaseException, task.exception())


class RemoteAgent:
    """The subset of :class:`~warden.agent.client.AgentClient` the SDK uses, over HTTP."""

    def __init__(self, http: httpx.AsyncClient, lines: RecordPool, vm_id: str) -> None:
        self._http = http
        self._lines = lines  # exec's output stream: the hot path, without httpx's cost
        self._id = vm_id
        self._base = f"{API}/sandboxes/{vm_id}"

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
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run a command through the daemon; see ``AgentClient.exec``.

        Small ``bytes`` stdin goes inline in the request. A stream (or more than
        ``INLINE_STDIN_MAX`` bytes) is streamed on a second request while the output streams
        back on the first. Output is kept up to ``max_output`` bytes per stream; a callback
        that takes its time slows the daemon and the guest down (nothing piles up). Cancelling
        the call closes the stream, which kills the command.
        """
        body, stream = _exec_body(cmd, user, env, cwd, timeout, stdin)
        output = _Output(max_output, on_stdout, on_stderr)
        feeder = _StdinFeeder(self._send_stdin, stream)
        try:
            async with self._lines.post(f"{self._base}/exec", body) as r:
                if r.status_code != 200:
                    _raise(await r.read(), vm_id=self._id)
                async for kind, payload in r.records():
                    if isinstance(payload, bytes):
                        await output.take(kind, payload)
                    elif "exec_id" in payload:
                        feeder.start(payload["exec_id"])
                    else:
                        output.final = payload
        finally:
            # The command has ended (or the call failed): what stdin is left no longer matters.
            await feeder.stop()
        feeder.raise_failure()  # e.g. the stdin source failed
        return output.result(cmd, timeout)

    async def _send_stdin(self, exec_id: str, stdin: bytes | AsyncIterable[bytes]) -> None:
        """Stream ``stdin`` to the command ``exec_id``; its end is the command's EOF."""
        r = await self._http.put(f"{self._base}/execs/{exec_id}/stdin", content=stdin)
        if r.status_code == 404:
            return  # the command ended before its stdin got there: not an error
        if not r.is_success:
            _raise(r, vm_id=self._id)

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        parents: bool = True,
        user: str = DEFAULT_USER,
    ) -> int:
        """Stream ``data`` into ``path`` (the daemon always makes the parents)."""
        params = {"path": path, "mode": str(mode), "user": user}
        r = await self._http.put(f"{self._base}/files", params=params, content=data)
        if not r.is_success:
            _raise(r, vm_id=self._id)
        return int(r.json()["size"])

    async def read_file(self, path: str, *, user: str = DEFAULT_USER) -> AsyncIterator[bytes]:
        """Stream a file from the guest; leaving the loop early closes the response (which
        stops the read). The next chunk is read only once the caller took the last one."""
        params = {"path": path, "user": user}
        async with self._http.stream("GET", f"{self._base}/files", params=params) as r:
            if not r.is_success:
                _raise(await _read_bounded(r), vm_id=self._id)
            async for chunk in r.aiter_raw(READ_CHUNK):
                yield chunk

    def _unsupported(self, what: str) -> NoReturn:
        raise RemoteUnsupportedError(
            f"{what} is not available through the warden daemon yet (its API has no endpoint "
            "for it); run it as a command with sbx.commands.run(), or use embedded mode"
        )

    async def info(self) -> dict[str, object]:
        r = await self._http.get(f"{self._base}/guest")
        if r.status_code == 404 and _is_no_route(r):
            self._unsupported("sandbox.info()")
        if not r.is_success:
            _raise(r, vm_id=self._id)
        return cast(dict[str, object], r.json())

    async def ping(self) -> float:
        """The whole round trip: to the daemon, to the agent and back, in seconds."""
        start = time.perf_counter()
        r = await self._http.post(f"{self._base}/ping")
        elapsed = time.perf_counter() - start
        if r.status_code in (404, 405) and _is_no_route(r):
            self._unsupported("sandbox.ping()")
        if not r.is_success:
            _raise(r, vm_id=self._id)
        return elapsed

    async def _files(self, method: str, what: str, op: str = "", **params: Any) -> Any:
        """One of the daemon's small file endpoints; unsupported if the daemon lacks it."""
        url = f"{self._base}/files/{op}" if op else f"{self._base}/files"
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
        r = await self._http.request(method, url, params=query)
        if r.status_code == 405 or (r.status_code == 404 and _is_no_route(r)):
            self._unsupported(what)
        if not r.is_success:
            _raise(r, vm_id=self._id)
        return r.json() if r.status_code != 204 and r.content else None

    async def list_dir(self, path: str, *, user: str = DEFAULT_USER) -> list[EntryInfo]:
        entries = await self._files("GET", "files.list()", "list", path=path, user=user)
        return [EntryInfo.from_json(e) for e in entries]

    async def stat(self, path: str, *, user: str = DEFAULT_USER) -> EntryInfo:
        entry = await self._files("GET", "files.stat()", "stat", path=path, user=user)
        return EntryInfo.from_json(entry)

    async def remove(self, path: str, *, recursive: bool = False, user: str = DEFAULT_USER) -> None:
        await self._files("DELETE", "files.remove()", path=path, recursive=recursive, user=user)

    async def make_dir(
        self, path: str, *, parents: bool = True, mode: int = 0o755, user: str = DEFAULT_USER
    ) -> None:
        await self._files(
            "POST", "files.make_dir()", "mkdir", path=path, parents=parents, mode=mode, user=user
        )


async def _read_bounded(response: httpx.Response) -> httpx.Response:
    """An error answer with its body read, refusing one over ``MAX_ERROR_BODY`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for data in response.aiter_raw():
        size += len(data)
        if size > MAX_ERROR_BODY:
            raise HostError(
                f"the warden daemon sent an error answer of more than {MAX_ERROR_BODY} bytes "
                f"(HTTP {response.status_code})"
            )
        parts.append(data)
    content = b"".join(parts)
    return httpx.Response(response.status_code, headers=response.headers, content=content)


def _is_no_route(response: httpx.Response) -> bool:
    """A 404 of the router itself (no such endpoint), not of a VM or a file."""
    answer = api_errors.parse(response.status_code, response.content)
    return answer.type == api_errors.HTTP_ERROR and answer.message == "Not Found"


async def _call(callback: OutputCallback | None, chunk: bytes) -> None:
    if callback is not None:
        result = callback(chunk)
        if inspect.isawaitable(result):
            await result


class _Output:
    """What a remote command wrote: kept up to ``max_output`` bytes per stream, all of it
    handed to the callbacks; and its final status."""

    def __init__(
        self, max_output: int, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
    ) -> None:
        self.max_output = max_output
        self.streams = {Kind.STDOUT: bytearray(), Kind.STDERR: bytearray()}
        self.callbacks = {Kind.STDOUT: on_stdout, Kind.STDERR: on_stderr}
        self.truncated = False
        self.final: dict[str, Any] | None = None

    async def take(self, kind: Kind, chunk: bytes) -> None:
        kept = self.streams[kind]
        room = self.max_output - len(kept)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            kept += chunk[:room]
        await _call(self.callbacks[kind], chunk)

    def result(self, cmd: list[str] | str, timeout: float | None) -> ExecResult:
        final = self.final
        if final is None:
            raise AgentError("the warden daemon ended the command's output without a result")
        if "error" in final:
            raise AgentError(str(final["error"]))
        result = ExecResult(
            exit_code=_opt_int(final.get("exit_code")),
            signal=_opt_int(final.get("signal")),
            stdout=bytes(self.streams[Kind.STDOUT]),
            stderr=bytes(self.streams[Kind.STDERR]),
            timed_out=bool(final.get("timed_out")),
            truncated=self.truncated,
        )
        if result.timed_out:
            error = CommandTimeoutError(
                f"the command ran longer than its timeout={timeout}s and was killed; pass a "
                f"larger timeout= (or timeout=None) to let it run longer: {cmd!r}"
            )
            error.result = result
            raise error
        return result


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RemoteMachine:
    """Stands where a :class:`~warden.vmm.machine.Machine` stands in an ``AsyncSandbox``."""

    def __init__(
        self, endpoint: Endpoint, http: httpx.AsyncClient, row: dict[str, Any], spec: VMSpec
    ):
        self.endpoint = endpoint
        self.id: str = row["id"]
        self.spec = spec
        self.state = VMState(row["state"])
        self.exit_code: int | None = row.get("exit_code")
        self._http = http
        self._lines = RecordPool(endpoint)
        self._agent = RemoteAgent(http, self._lines, self.id)

    @property
    def agent(self) -> RemoteAgent:
        return self._agent

    def console_tail(self, lines: int = 40) -> str:
        """The tail of the guest console, as the daemon has it ("" if it cannot say)."""
        try:
            with self.endpoint.sync_client(10.0) as c:
                r = c.get(f"{API}/sandboxes/{self.id}/logs", params={"lines": lines})
        except httpx.HTTPError:
            return ""
        return r.text if r.is_success else ""

    async def save_template(
        self, name: str, *, keep_running: bool, extra: dict[str, Any] | None = None
    ) -> None:
        """Have the daemon save this VM as template ``name`` (it keeps running; the daemon
        records the source itself, so ``extra`` is not sent)."""
        if not keep_running:
            raise RemoteUnsupportedError("a daemon's VM keeps running after save_template")
        r = await self._http.post(
            f"{API}/sandboxes/{self.id}/template", json={"name": name}, timeout=300.0
        )
        if not r.is_success:
            _raise(r)

    async def fork(self, n: int = 1) -> list[RemoteMachine]:
        """Have the daemon start ``n`` children of this VM; each gets a client of its own."""
        r = await self._http.post(f"{API}/sandboxes/{self.id}/fork", json={"n": n}, timeout=300.0)
        if not r.is_success:
            _raise(r)
        children = []
        for row in r.json():
            http = self.endpoint.async_client(httpx.Timeout(60.0, read=None))
            spec = self.spec.model_copy(update={"name": None, "template": None})
            children.append(RemoteMachine(self.endpoint, http, row, spec))
        return children

    async def links_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A call to the daemon's ``/v1/links`` (``sbx.links``); its JSON answer."""
        try:
            r = await self._http.request(method, f"{API}/links{path}", json=body, timeout=60.0)
        except httpx.TransportError as exc:
            raise HostError(self.endpoint.unreachable(exc)) from None
        if not r.is_success:
            _raise(r)
        return r.json()

    async def pause(self) -> None:
        """Have the daemon save the VM to disk and end its QEMU."""
        await self._lifecycle("pause")

    async def resume(self) -> None:
        """Have the daemon start the paused VM again from its saved state."""
        await self._lifecycle("resume")

    async def _lifecycle(self, action: str) -> None:
        try:
            r = await self._http.post(f"{API}/sandboxes/{self.id}/{action}", timeout=300.0)
        except httpx.TransportError as exc:
            raise HostError(self.endpoint.unreachable(exc)) from None
        if not r.is_success:
            _raise(r, vm_id=self.id)
        self.state = VMState(r.json()["state"])

    async def shutdown(self) -> None:
        """Remove the VM from the daemon (killing it). Safe to call twice."""
        if self.state in (VMState.STOPPED, VMState.FAILED) and self._http.is_closed:
            return
        try:
            r = await self._http.delete(
                f"{API}/sandboxes/{self.id}", params={"force": "true"}, timeout=120.0
            )
            if not r.is_success and r.status_code != 404:
                _raise(r)
            self.state = VMState.STOPPED
        finally:
            if self.state is VMState.STOPPED:
                await self._lines.aclose()
                await self._http.aclose()


class _AsyncFactory:
    """``client.AsyncSandbox``: ``await client.AsyncSandbox.create(...)``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    async def create(
        self, image: str = "default", **options: Unpack[CreateOptions]
    ) -> AsyncSandbox:
        """Create a sandbox on the daemon; the options of ``AsyncSandbox.create``
        (:class:`~warden.sdk._create.CreateOptions`).

        ``accel`` is the daemon's to choose: only its default is accepted.
        ``require_jail=True`` has the daemon refuse (``JailUnavailableError``, HTTP 409,
        nothing recorded) unless its host gives the VM every jail feature.
        The sandbox is removed from the daemon by ``kill()``/``close()``/leaving ``with``.
        """
        call = Create.of(image, options)
        if call.accel != Create.accel:
            raise SpecError(
                "the warden daemon chooses the accelerator itself; leave accel at its "
                "default, or use embedded mode (warden.Sandbox)"
            )
        # The same checks as embedded mode, before asking; the host's are the daemon's.
        spec = call.spec(check_host=False)
        fields: dict[str, Any] = {
            "image": call.image,
            "memory_mib": call.memory_mib,
            "vcpus": call.vcpus,
            "env": call.env,
            "labels": call.labels,
        }
        fields.update({k: v for k, v in (("name", call.name), ("template", call.template)) if v})
        if call.require_jail:  # only when asked: a daemon that predates it refuses the field
            fields["require_jail"] = True
        if call.boot != Create.boot:  # likewise
            fields["boot"] = call.boot
        timeout = call.timeout
        http = self._endpoint.async_client(httpx.Timeout(60.0, read=None))
        try:
            r = await http.post(f"{API}/sandboxes", json=fields, timeout=timeout + 60.0)
            if not r.is_success:
                _raise(r)
        except httpx.TransportError as exc:
            await http.aclose()
            raise HostError(self._endpoint.unreachable(exc)) from None
        except BaseException:
            await http.aclose()
            raise
        machine = RemoteMachine(self._endpoint, http, r.json(), spec)
        return AsyncSandbox(machine)

    async def resume(self, sandbox_id: str) -> AsyncSandbox:
        """Resume a sandbox the daemon holds paused (by any client, after a daemon restart
        too); ``PausedStateError`` if its saved state was refused, and
        ``StateTransitionError`` unless it is paused."""
        http = self._endpoint.async_client(httpx.Timeout(60.0, read=None))
        try:
            r = await http.get(f"{API}/sandboxes/{sandbox_id}")
            if not r.is_success:
                _raise(r, vm_id=sandbox_id)
            row = r.json()
            spec = VMSpec.parse(
                check_host=False,
                image=row["image"],
                memory_mib=row["memory_mib"],
                vcpus=row["vcpus"],
                name=row["name"],
                labels=row["labels"],
            )
            machine = RemoteMachine(self._endpoint, http, row, spec)
            await machine.resume()
        except httpx.TransportError as exc:
            await http.aclose()
            raise HostError(self._endpoint.unreachable(exc)) from None
        except BaseException:
            await http.aclose()
            raise
        return AsyncSandbox(machine)


class _SyncFactory:
    """``client.Sandbox``: ``client.Sandbox.create(...)``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._async = _AsyncFactory(endpoint)

    def resume(self, sandbox_id: str) -> Sandbox:
        """See :meth:`_AsyncFactory.resume`."""
        from warden.sdk import _portal

        return Sandbox(_portal.call(self._async.resume(sandbox_id)))

    def create(self, image: str = "default", **options: Unpack[CreateOptions]) -> Sandbox:
        """See :meth:`_AsyncFactory.create`."""
        from warden.sdk import _portal

        return Sandbox(_portal.call(self._async.create(image, **options)))


class Client:
    """A connection to a warden daemon. ``client.Sandbox`` and ``client.AsyncSandbox`` have
    the ``create`` of ``warden.Sandbox`` and ``warden.AsyncSandbox``, and make the same
    classes."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        self.Sandbox = _SyncFactory(endpoint)
        self.AsyncSandbox = _AsyncFactory(endpoint)

    def __repr__(self) -> str:
        return f"warden.Client({self.url!r})"

    def create(self, image: str = "default", **options: Unpack[CreateOptions]) -> Sandbox:
        """Shorthand for ``client.Sandbox.create(...)``."""
        return self.Sandbox.create(image, **options)

    def templates(self, *, all: bool = False) -> list[dict[str, Any]]:
        """The daemon's templates (as ``GET /v1/templates`` lists them); with ``all``, the
        automatic boot templates too."""
        path = f"{API}/templates?all=true" if all else f"{API}/templates"
        return cast(list[dict[str, Any]], self._call("GET", path).json())

    def remove_template(self, name: str) -> None:
        """Delete template ``name`` on the daemon (its clones keep running)."""
        self._call("DELETE", f"{API}/templates/{name}")

    def save_template(self, sandbox: str, name: str) -> dict[str, Any]:
        """Save the daemon's running sandbox ``sandbox`` (id or name) as template ``name``;
        it keeps running. Returns the template as ``templates()`` lists it."""
        r = self._call("POST", f"{API}/sandboxes/{sandbox}/template", {"name": name}, timeout=300.0)
        return cast(dict[str, Any], r.json())

    def list(self, *, all: bool = False) -> list[dict[str, Any]]:
        """The daemon's sandboxes (``all``: stopped, failed and pool members too), as
        ``GET /v1/sandboxes`` lists them: only those the caller may see."""
        r = self._call("GET", f"{API}/sandboxes", params={"all": str(all).lower()})
        return cast(builtins.list[dict[str, Any]], r.json())

    def inspect(self, sandbox: str) -> dict[str, Any]:
        """Everything the daemon knows of sandbox ``sandbox`` (id or name)."""
        return cast(dict[str, Any], self._call("GET", f"{API}/sandboxes/{sandbox}").json())

    def stop(self, sandbox: str) -> dict[str, Any]:
        """Stop sandbox ``sandbox``; it stays listed (``list(all=True)``) until removed."""
        r = self._call("POST", f"{API}/sandboxes/{sandbox}/stop", timeout=LIFECYCLE_TIMEOUT_S)
        return cast(dict[str, Any], r.json())

    def remove(self, sandbox: str, *, force: bool = False) -> None:
        """Remove sandbox ``sandbox``; a running one only with ``force`` (it is killed)."""
        params = {"force": str(force).lower()}
        self._call("DELETE", f"{API}/sandboxes/{sandbox}", params=params, timeout=120.0)

    def logs(self, sandbox: str, *, lines: int = 100) -> str:
        """The last ``lines`` lines of sandbox ``sandbox``'s console."""
        r = self._call("GET", f"{API}/sandboxes/{sandbox}/logs", params={"lines": str(lines)})
        return r.text

    def pause(self, sandbox: str) -> dict[str, Any]:
        """Save sandbox ``sandbox`` to disk and end its QEMU (``resume`` starts it again)."""
        r = self._call("POST", f"{API}/sandboxes/{sandbox}/pause", timeout=LIFECYCLE_TIMEOUT_S)
        return cast(dict[str, Any], r.json())

    def resume(self, sandbox: str) -> dict[str, Any]:
        """Start paused sandbox ``sandbox`` again from its sealed saved state."""
        r = self._call("POST", f"{API}/sandboxes/{sandbox}/resume", timeout=LIFECYCLE_TIMEOUT_S)
        return cast(dict[str, Any], r.json())

    def fork(self, sandbox: str, n: int = 1) -> builtins.list[dict[str, Any]]:
        """Start ``n`` children of running sandbox ``sandbox``; they carry on from its state."""
        r = self._call(
            "POST", f"{API}/sandboxes/{sandbox}/fork", {"n": n}, timeout=LIFECYCLE_TIMEOUT_S
        )
        return cast(builtins.list[dict[str, Any]], r.json())

    def create_link(self, a: str, b: str, name: str, *, transport: str = "ring") -> dict[str, Any]:
        """Link running sandboxes ``a`` and ``b`` (ids or names) as ``name``: each gets
        ``/run/warden/links/NAME.sock``. See :meth:`warden.sdk._links.AsyncLinks.create`."""
        body = {"a": a, "b": b, "name": name, "transport": transport}
        return cast(dict[str, Any], self._call("POST", f"{API}/links", body, timeout=60.0).json())

    def links(self) -> builtins.list[dict[str, Any]]:
        """The daemon's open links."""
        return cast(builtins.list[dict[str, Any]], self._call("GET", f"{API}/links").json())

    def remove_link(self, name: str) -> dict[str, Any]:
        """Close both ends of link ``name``; LinkNotFoundError if there is none."""
        r = self._call("DELETE", f"{API}/links/{name}", timeout=60.0)
        return cast(dict[str, Any], r.json())

    def create_token(
        self, name: str, *, roles: Sequence[str] = ("user",), expires: str | None = None
    ) -> dict[str, Any]:
        """Make an API token of principal ``name`` (an admin action); its ``text`` is in the
        result only. ``expires``: ``30d``, ``12h``, ``90m``, ``2w`` or a date (UTC)."""
        body = {"name": name, "roles": list(roles), "expires": expires}
        return cast(dict[str, Any], self._call("POST", f"{API}/tokens", body).json())

    def tokens(self) -> builtins.list[dict[str, Any]]:
        """The daemon's API tokens (never their secrets)."""
        return cast(builtins.list[dict[str, Any]], self._call("GET", f"{API}/tokens").json())

    def revoke_token(self, which: str) -> builtins.list[dict[str, Any]]:
        """Revoke token ``which`` (an id), or every active token of principal ``which``;
        the tokens revoked now. ``TokenNotFoundError`` if there is none."""
        r = self._call("DELETE", f"{API}/tokens/{which}")
        return cast(builtins.list[dict[str, Any]], r.json())

    def _call(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, str] | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> httpx.Response:
        try:
            with self.endpoint.sync_client(timeout) as c:
                r = c.request(method, url, json=body, params=params)
        except httpx.TransportError as exc:
            raise HostError(self.endpoint.unreachable(exc)) from None
        if not r.is_success:
            _raise(r)
        return r

    def info(self) -> dict[str, Any]:
        """The daemon's host capacity, overcommit ratios and reservations."""
        try:
            with self.endpoint.sync_client(CONNECT_TIMEOUT_S) as c:
                r = c.get(f"{API}/info")
        except httpx.TransportError as exc:
            raise HostError(self.endpoint.unreachable(exc)) from None
        if not r.is_success:
            _raise(r)
        return cast(dict[str, Any], r.json())

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def connect(
    url: str | None = None, *, token: str | None = None, ca_cert: str | None = None
) -> Client:
    """Connect to a warden daemon and check that it answers.

    ``url`` is ``unix:///path/to.sock`` (or just the path), or ``https://host:port`` for a
    daemon's TCP listener; by default ``$WARDEN_HOST``, else the local daemon's socket
    ``$WARDEN_HOME/api/warden.sock``. Over TCP, ``token`` (default ``$WARDEN_TOKEN``) is the
    daemon's API token and ``ca_cert`` (default ``$WARDEN_CA_CERT``) a copy of its certificate.
    """
    client = Client(Endpoint.resolve(url, token=token, ca_cert=ca_cert))
    client.info()
    return client
