"""The public surface is small and deliberate: adding to it is a decision, not an accident."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import warden
from warden.sdk import AsyncSandbox, Sandbox

EXPECTED_ALL = {
    "AgentError",
    "AgentTimeoutError",
    "AgentUnresponsiveError",
    "AsyncSandbox",
    "AuthenticationError",
    "Client",
    "CommandResult",
    "CommandTimeoutError",
    "EntryInfo",
    "GuestFileError",
    "GuestOperationRefusedError",
    "HostError",
    "ImageError",
    "LaunchError",
    "LinkError",
    "LinkNotFoundError",
    "PermissionDeniedError",
    "Sandbox",
    "SandboxClosedError",
    "SizeLimitError",
    "SpecError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateRefusedError",
    "TooManyConnectionsError",
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


def _creates() -> dict[str, Callable[..., object]]:
    from warden.sdk._remote import Client, _AsyncFactory, _SyncFactory

    return {
        "Sandbox.create": Sandbox.create,
        "AsyncSandbox.create": AsyncSandbox.create,
        "client.Sandbox.create": _SyncFactory.create,
        "client.AsyncSandbox.create": _AsyncFactory.create,
        "client.create": Client.create,
    }


def test_every_create_takes_the_options_declared_once() -> None:
    """The five factories take ``image`` and ``**options: Unpack[CreateOptions]``: no
    factory copies the option list (issue 9, "create() has five copies of its parameters")."""
    for where, create in _creates().items():
        params = [p for p in inspect.signature(create).parameters.values() if p.name != "self"]
        assert [(p.name, p.kind) for p in params] == [
            ("image", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            ("options", inspect.Parameter.VAR_KEYWORD),
        ], where
        assert params[0].default == "default", where
        assert params[1].annotation == "Unpack[CreateOptions]", where


def test_create_options_and_their_defaults_agree() -> None:
    import dataclasses

    from warden.sdk._create import Create, CreateOptions

    fields = {f.name for f in dataclasses.fields(Create)}
    assert fields == {"image", *CreateOptions.__annotations__}


def test_the_daemons_create_body_has_only_options_of_create() -> None:
    """What ``POST /v1/sandboxes`` accepts is a subset of the SDK's options (the daemon
    chooses accel itself; the agent timeout is the client's; boot, "cold" or not, is asked)."""
    import dataclasses

    from warden.sdk._create import Create
    from warden.server.models import CreateRequest

    options = {f.name for f in dataclasses.fields(Create)}
    assert set(CreateRequest.model_fields) <= options
    assert options - set(CreateRequest.model_fields) == {"accel", "timeout"}


def test_an_unknown_create_option_is_a_type_error_naming_it() -> None:
    import pytest

    from warden.sdk._create import Create

    with pytest.raises(TypeError, match=r"'memory'.*memory_mib"):
        Create.of("default", {"memory": 512})  # type: ignore[typeddict-unknown-key]
