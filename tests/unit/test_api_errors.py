"""The error contract (``api/errors.py``): every class of the error tree survives the trip
server → body → client as the same class, and the status comes from the one table."""

from __future__ import annotations

import errno
import json

import pytest

from warden import _errors
from warden.api import errors as api_errors


def _instance(cls: type[_errors.WardenError]) -> _errors.WardenError:
    if cls is _errors.LaunchError:
        return cls("boom", ["qemu"], 1, "tail")
    if cls is _errors.ImageBuildError:
        return cls("step", ["cmd"], "tail")
    if issubclass(cls, _errors.GuestFileError):
        return cls(errno.EACCES, "denied: /etc/shadow")
    return cls("what happened, and what to do")


@pytest.mark.parametrize("name", sorted(api_errors.error_types()))
def test_every_error_class_comes_back_as_itself(name: str) -> None:
    cls = api_errors.error_types()[name]
    try:
        exc = _instance(cls)
    except TypeError:
        pytest.skip(f"{name} needs arguments this test does not know")
    status, payload = api_errors.encode(exc)
    answer = api_errors.parse(status, payload)
    assert answer.type == name and answer.status == status
    back = api_errors.to_exception(answer)
    if "__init__" in cls.__dict__ and not issubclass(
        cls, _errors.GuestFileError | _errors.AdmissionError
    ):
        assert isinstance(exc, type(back)) and isinstance(back, _errors.WardenError)
    elif cls is _errors.WardenError:
        assert isinstance(back, _errors.HostError)
    else:
        assert type(back) is cls
    assert str(exc) in str(back) or cls in (_errors.LaunchError, _errors.ImageBuildError)


def test_statuses_come_from_the_table() -> None:
    assert api_errors.status_of(_errors.VMNotFoundError("x")) == 404
    assert api_errors.status_of(_errors.NameConflictError("x")) == 409
    assert api_errors.status_of(_errors.AuthenticationError("x")) == 401
    assert api_errors.status_of(_errors.PermissionDeniedError("x")) == 403
    assert api_errors.status_of(_errors.TemplateNotFoundError("x")) == 404
    assert api_errors.status_of(_errors.TemplateRefusedError("x")) == 409
    assert api_errors.status_of(_errors.GuestFileError(errno.ENOENT, "x")) == 404
    assert api_errors.status_of(_errors.GuestFileError(errno.EISDIR, "x")) == 400
    assert api_errors.status_of(_errors.WardenError("x")) == 500


def test_extra_fields_travel() -> None:
    status, payload = api_errors.encode(_errors.AdmissionError("full", limits=("memory",)))
    back = api_errors.to_exception(api_errors.parse(status, payload))
    assert isinstance(back, _errors.AdmissionError) and back.limits == ("memory",)
    status, payload = api_errors.encode(_errors.GuestFileError(errno.ENOTDIR, "x"))
    back = api_errors.to_exception(api_errors.parse(status, payload))
    assert isinstance(back, _errors.GuestFileError) and back.errno == errno.ENOTDIR


@pytest.mark.parametrize(
    "content",
    [
        b"<html>bad gateway</html>",
        b"",
        b"[1, 2]",
        json.dumps({"error": "old-style"}).encode(),
        json.dumps({"error": {"type": "NoSuchClass", "message": "m"}}).encode(),
        json.dumps({"error": {"type": 7, "message": "m"}}).encode(),
    ],
)
def test_answers_outside_the_contract_are_a_host_error(content: bytes) -> None:
    back = api_errors.to_exception(api_errors.parse(502, content))
    assert type(back) is _errors.HostError and "502" in str(back)


def test_a_client_never_raises_a_class_from_outside_the_tree() -> None:
    payload = json.dumps({"error": {"type": "SystemExit", "message": "bye"}}).encode()
    assert type(api_errors.to_exception(api_errors.parse(500, payload))) is _errors.HostError
