"""What the API accepts: the size of request bodies, and the length and count of every field.

A request past a limit gets a 413 (the body) or a 422 (a field), and the message names the
limit, so the client knows what to change. The constants are the whole policy; the models
(``server/models.py``) and the routes apply them, and :class:`BodyLimit` bounds the bytes a
JSON body may take before anything parses it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warden.api import errors as api_errors
from warden.vmm.spec import ENV_KEY_RE

MAX_JSON_BODY = 1 << 20
"""Bytes of a JSON request body (1 MiB). File contents and streamed stdin are not JSON and
have no such limit: they stream to the guest with backpressure."""

MAX_PATH = 4096
"""Characters of a guest path or working directory (Linux's PATH_MAX)."""
MAX_REF = 128
"""Characters of a sandbox id or name in a URL."""
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024
MAX_ENV = 256
"""Environment variables of a sandbox or of one command."""
MAX_ENV_KEY = 256
MAX_ENV_VALUE = 32 * 1024
MAX_ARGV = 4096
"""Arguments of a command."""
MAX_ARG = 128 * 1024
"""Characters of one argument, or of a shell command line (Linux's MAX_ARG_STRLEN)."""
MAX_EXEC_TIMEOUT_S = 86400.0
"""A command's timeout, at most a day."""
MAX_MODE = 0o7777
MAX_MEMORY_MIB = 1024 * 1024
"""A VM's memory, as VMSpec allows it (the minimum is VMSpec's MIN_MEMORY_MIB)."""
MAX_EVENT_ID = 2**63 - 1
"""SQLite's largest integer."""

WorkloadUser = Literal["user", "root"]
"""Who a command or file operation runs as in the guest: the unprivileged ``user`` (uid 1000)
or ``root`` (on a daemon, only for a caller the access policy grants ``exec-as-root``). The
names of :data:`warden.wire.ops.USERS`."""


def no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL byte; remove it")
    return value


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: not ASCII
        raise ValueError(f"is not valid base64 ({exc}); encode stdin with base64") from None
    return value


def _absolute(value: str) -> str:
    no_nul(value)
    if not value.startswith("/"):
        raise ValueError(f"{value[:80]!r} is relative; give an absolute path (starting with /)")
    return value


def _env_key(value: str) -> str:
    if not ENV_KEY_RE.match(value):
        raise ValueError(
            f"{value[:80]!r} is not a valid environment variable name; use letters, digits "
            "and '_', not starting with a digit"
        )
    return value


GuestPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH), AfterValidator(_absolute)]
"""An absolute path in the guest, without NUL bytes, at most MAX_PATH characters."""
Arg = Annotated[str, Field(max_length=MAX_ARG), AfterValidator(no_nul)]
EnvKey = Annotated[str, Field(min_length=1, max_length=MAX_ENV_KEY), AfterValidator(_env_key)]
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE), AfterValidator(no_nul)]
Env = Annotated[dict[EnvKey, EnvValue], Field(max_length=MAX_ENV)]
LabelKey = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_KEY)]
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]
Base64 = Annotated[str, AfterValidator(_base64)]
Timeout = Annotated[float, Field(gt=0, le=MAX_EXEC_TIMEOUT_S, allow_inf_nan=False)]

_STREAMED = re.compile(r"^/v1/sandboxes/[^/]+/(files|execs/[^/]+/stdin)$")
"""The PUT routes whose body is a raw stream, not JSON."""


class BodyLimit:
    """ASGI middleware: a request body of more than ``limit`` bytes gets a 413, whether its
    Content-Length says so or its (chunked) bytes do. The body is read here, at most ``limit``
    bytes, and handed on whole; the streamed PUTs of file contents and stdin pass untouched."""

    def __init__(self, app: ASGIApp, limit: int = MAX_JSON_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "PUT" and _STREAMED.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, send: Send) -> None:
        message = (
            f"the request body is larger than the limit of {self.limit} bytes "
            f"({self.limit // 1024} KiB) for JSON requests; send less (file contents go as the "
            "streamed body of PUT .../files, large stdin with stdin_stream)"
        )
        payload = json.dumps(api_errors.body(api_errors.HTTP_ERROR, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),  # the rest of the body is not read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
