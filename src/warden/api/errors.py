"""Error answers, declared once for the server and its clients.

Every error answer of the daemon has the body::

    {"error": {"type": "VMNotFoundError", "message": "no VM has id or name 'x'", ...}}

``type`` is the name of a class of the error tree (``warden._errors``), and clients raise that
class: they never look at the message text. A few types carry more fields: ``errno`` for a
:class:`~warden._errors.GuestFileError`, ``limits`` for an
:class:`~warden._errors.AdmissionError`, ``problems`` for a body that failed validation
(``SpecError``). :data:`STATUS` maps a class to its HTTP status; the same table is read by the
server (:func:`status_of`) and by the clients (:func:`to_exception`, which needs no status).

No pydantic, httpx or FastAPI here: the CLI's fast path imports this module.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from warden import _errors
from warden._errors import (
    AdmissionError,
    AgentError,
    AgentTimeoutError,
    AuthenticationError,
    GuestFileError,
    HostError,
    ImageNotFoundError,
    JailUnavailableError,
    LinkError,
    LinkNotFoundError,
    NameConflictError,
    PausedStateError,
    PermissionDeniedError,
    PolicyError,
    SandboxClosedError,
    SpecError,
    StateTransitionError,
    TemplateError,
    TemplateNotFoundError,
    TokenNotFoundError,
    TooManyConnectionsError,
    VMNotFoundError,
    WardenError,
)

STATUS: tuple[tuple[type[WardenError], int], ...] = (
    (AuthenticationError, 401),  # no, a wrong, an expired or a revoked credential
    (PermissionDeniedError, 403),  # the policy refuses the caller this action (or the guest op)
    (PolicyError, 409),  # a reload of a bad policy.toml: the old policy stays
    (VMNotFoundError, 404),
    (TokenNotFoundError, 404),
    (ImageNotFoundError, 404),
    (NameConflictError, 409),
    (TemplateNotFoundError, 404),
    (LinkNotFoundError, 404),
    (LinkError, 409),  # a self-link, a name in use, an end that would not open
    (TemplateError, 409),  # refused (its seal, image or QEMU changed), or not from a clone
    (StateTransitionError, 409),
    (PausedStateError, 409),  # a paused VM's saved state was refused (tampered, say)
    (AdmissionError, 409),
    (JailUnavailableError, 409),  # the create required the jail and the host lacks a feature
    (SpecError, 422),
    (SandboxClosedError, 409),  # the VM was stopped or died under the request
    (TooManyConnectionsError, 503),  # the daemon's bound on client connections (connections.py)
    (AgentTimeoutError, 504),  # the guest's agent did not answer in time
    (AgentError, 502),  # the guest's agent failed or broke the protocol
)
"""The HTTP status of each error the API expects, first match wins; any other WardenError is
a 500 (the daemon's own fault). A :class:`GuestFileError` is a 404 (``ENOENT``) or a 400."""

HTTP_ERROR = "HTTPError"
"""The ``type`` of an answer that no warden error made: an unknown route (404), a wrong method
(405), a body over the size limit (413)."""


def status_of(exc: WardenError) -> int:
    """The HTTP status of ``exc``'s answer."""
    if isinstance(exc, GuestFileError):
        return 404 if exc.errno == errno_mod.ENOENT else 400
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 500)


def body(type_name: str, message: str, **extra: Any) -> dict[str, Any]:
    """An error answer's body."""
    return {"error": {"type": type_name, "message": message, **extra}}


def body_of(exc: WardenError) -> dict[str, Any]:
    """The body of the answer to ``exc``, with the fields its type carries."""
    extra: dict[str, Any] = {}
    if isinstance(exc, GuestFileError) and exc.errno is not None:
        extra["errno"] = exc.errno
    if isinstance(exc, AdmissionError) and exc.limits:
        extra["limits"] = list(exc.limits)
    return body(type(exc).__name__, str(exc), **extra)


def encode(exc: WardenError) -> tuple[int, bytes]:
    """``(status, JSON body)`` of the answer to ``exc``."""
    return status_of(exc), json.dumps(body_of(exc)).encode()


@functools.cache
def error_types() -> dict[str, type[WardenError]]:
    """Every class of the error tree, by name."""
    found: dict[str, type[WardenError]] = {}
    todo: list[type[WardenError]] = [WardenError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == _errors.__name__:
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


@dataclass(frozen=True)
class ErrorAnswer:
    """An error answer as a client read it."""

    status: int
    type: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The message and the status, for an exception or the CLI."""
        return f"{self.message} (HTTP {self.status})"


def parse(status: int, content: bytes) -> ErrorAnswer:
    """Read an error answer; one that is not in the contract's shape (a proxy's page, say)
    keeps its text as the message, with the type ``HTTPError``."""
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type")
        extra = {k: v for k, v in error.items() if k not in ("type", "message")}
        name = kind if isinstance(kind, str) else HTTP_ERROR
        return ErrorAnswer(status, name, error["message"], extra)
    text = content.decode("utf-8", "replace").strip()[:2000] or f"HTTP {status}"
    return ErrorAnswer(status, HTTP_ERROR, text)


def to_exception(answer: ErrorAnswer) -> WardenError:
    """The exception the answer names, as embedded mode would raise it; an answer that names
    none (or a class this client does not know) is a :class:`HostError`."""
    cls = error_types().get(answer.type)
    message = answer.text()
    if cls is None or cls is WardenError:
        return HostError(f"the warden daemon refused the request: {message}")
    if issubclass(cls, GuestFileError):
        code = answer.extra.get("errno")
        return cls(code if isinstance(code, int) else None, message)
    if issubclass(cls, AdmissionError):
        limits = answer.extra.get("limits")
        names = tuple(str(x) for x in limits) if isinstance(limits, list) else ()
        return cls(message, limits=names)
    for base in cls.__mro__:  # LaunchError and ImageBuildError take more: their parent then
        if issubclass(base, WardenError) and (base is cls or "__init__" not in base.__dict__):
            try:
                return base(message)
            except TypeError:
                continue
    return HostError(message)
