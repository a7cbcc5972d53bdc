"""The public surface is small and deliberate: adding to it is a decision, not an accident."""

from __future__ import annotations

import inspect

import warden
from warden.sdk import AsyncSandbox, Sandbox

EXPECTED_ALL = {
    "AgentError",
    "AgentTimeoutError",
    "AgentUnresponsiveError",
    "AsyncSandbox",
    "Client",
    "CommandResult",
    "CommandTimeoutError",
    "EntryInfo",
    "GuestFileError",
    "GuestOperationRefusedError",
    "HostError",
    "ImageError",
    "LaunchError",
    "PermissionDeniedError",
    "Sandbox",
    "SandboxClosedError",
    "SizeLimitError",
    "SpecError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateRefusedError",
    "VMError",
    "WardenError",
    "__version__",
    "connect",
}


def test_all_is_pinned() -> None:
    assert set(warden.__all__) == EXPECTED_ALL
    for name in warden.__all__:
        assert getattr(warden, name) is not None


def test_every_error_is_a_warden_error() -> None:
    for name in warden.__all__:
        obj = getattr(warden, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, warden.WardenError), name


def _public(cls: type) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_")}


def test_sync_and_async_have_the_same_names_and_parameters() -> None:
    from warden.sdk import AsyncCommands, AsyncFiles, Commands, Files

    pairs: list[tuple[type, type]] = [
        (Sandbox, AsyncSandbox),
        (Commands, AsyncCommands),
        (Files, AsyncFiles),
    ]
    for sync_cls, async_cls in pairs:
        assert _public(sync_cls) == _public(async_cls), sync_cls.__name__
        for name in _public(sync_cls):
            s, a = getattr(sync_cls, name), getattr(async_cls, name)
            if callable(s) and not isinstance(s, property):
                assert list(inspect.signature(s).parameters) == list(
                    inspect.signature(a).parameters
                ), f"{sync_cls.__name__}.{name}"
