"""Checking a request's arguments, and the shapes of error responses."""

from __future__ import annotations

from warden.wire.ops import ErrorKind, Key

# Not ``typing.TYPE_CHECKING``: importing typing is slow in the guest. Type checkers treat this
# name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Invalid(ValueError):
    """A request with bad arguments; answered with error "invalid"."""


class Shutdown(BaseException):
    """The host asked the agent to shut down (a control-flow signal, not an error)."""


def arg_str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise Invalid(f"{key!r} must be a string")
    return value


def arg_path(args: dict[str, Any]) -> str:
    path = arg_str(args, Key.PATH)
    if not path.startswith("/"):
        raise Invalid(f"path must be absolute: {path!r}")
    if "\0" in path:
        raise Invalid("path contains a NUL byte")
    return path


def arg_bool(args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise Invalid(f"{key!r} must be a boolean")
    return value


def arg_mode(args: dict[str, Any], default: int) -> int:
    value = args.get(Key.MODE, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise Invalid("'mode' must be an integer between 0 and 0o7777")
    return value


def failure(kind: str, message: str) -> dict[str, Any]:
    """An unsuccessful response."""
    return {Key.OK: False, Key.ERROR: kind, Key.MESSAGE: message}


def file_error(op: str, path: str, exc: OSError) -> dict[str, Any]:
    where = exc.filename if isinstance(exc.filename, str) else path
    strerror = exc.strerror or str(exc)
    response = failure(ErrorKind.FILE, f"{op} {where}: {strerror}")
    response[Key.ERRNO] = exc.errno
    response[Key.PATH] = where
    response[Key.STRERROR] = strerror
    return response
