"""The exception tree of warden.

Every error that warden raises on purpose descends from :class:`WardenError`,
and its message says what the user can do about it::

    WardenError
     +-- SpecError              an invalid VM spec or option; nothing was started
     +-- ImageError             a guest image is missing, corrupt, or failed to build
     |    +-- ImageNotFoundError
     |    +-- ImageBuildError   carries the failed command and the tail of its output
     +-- HostError              the host lacks something (QEMU, a kernel, a permission)
     |    +-- JailUnavailableError  the jail was required and the host lacks a feature of it;
     |    |                         nothing was started (HTTP 409 from a daemon)
     |    +-- TooManyConnectionsError  the daemon's bound on client connections, in all or
     |                                 from this caller; the request did not run (HTTP 503)
     +-- VMError                a VM failed to start or died
     |    +-- LaunchError       carries argv, exit code and console tail
     |    +-- AgentTimeoutError the guest agent did not answer in time (quotes the console)
     |         +-- AgentUnresponsiveError  a running agent missed a liveness ping or a call's
     |                                     deadline; its connection was closed
     |    +-- PausedStateError  a paused VM's saved state is missing or failed its seal;
     |                          it was not loaded (HTTP 409)
     +-- AgentError             the guest agent refused or failed an operation
     |    +-- ProtocolError     a malformed frame; the connection was closed
 |    |    +-- ChannelAuthError  the encrypted channel refused a handshake or a record
     |    +-- CommandTimeoutError  a command passed its timeout and was killed
     |    +-- GuestFileError    a file operation failed in the guest (errno + path)
     +-- SandboxClosedError     the sandbox was killed or closed already
     +-- SizeLimitError         a file copied out of a guest passed the caller's max_size
     +-- StoreError             the manager's state database refused a change
     |    +-- NameConflictError    the name is taken (HTTP 409)
     |    +-- VMNotFoundError      no VM has that id or name (HTTP 404)
     |    +-- StateTransitionError the VM cannot go from its state to that one (HTTP 409)
     +-- AuthenticationError    no, a wrong, an expired or a revoked credential (HTTP 401)
     +-- PermissionDeniedError  the policy denies the caller that action (HTTP 403); the
     |    |                 message names the action and the rule (or "no rule allows")
     |    +-- GuestOperationRefusedError  the sandbox's own policy refuses that guest
     |                                    operation, whoever asks (HTTP 403)
     +-- TokenNotFoundError     no API token has that id or principal name (HTTP 404)
     +-- AdmissionError         the host's capacity x overcommit ratio would be passed (409)
     +-- TemplateError          a template cannot be made, found or used
     |    +-- TemplateNotFoundError  no template has that name (HTTP 404)
     |    +-- TemplateRefusedError   its seal, image or QEMU no longer matches: rebuild it (409)
     +-- LinkError              a VM-to-VM link was refused (a self-link, a name in use, an end
     |    |                     that would not open) or broke; nothing was left open (HTTP 409)
     |    +-- LinkNotFoundError    no link has that name (HTTP 404)
     +-- PolicyError            the access policy (policy.toml) is invalid: the message names
     |                          the line or key and what to write; nothing changed (409)
     +-- AuditError             the audit log (``warden.audit``) refused or failed an operation
          +-- AuditRecordError     a record was refused (too big, a bad field); nothing written
          +-- AuditLogError        the log cannot be opened or written (keys, lock, disk)

``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations


class WardenError(Exception):
    """Base class of every error that warden raises on purpose."""


class SpecError(WardenError, ValueError):
    """A VM spec or option is invalid. Nothing was started."""


class ImageError(WardenError):
    """A guest image is missing, corrupt or could not be built."""


class ImageNotFoundError(ImageError):
    """No built image has that name."""


class ImageBuildError(ImageError):
    """A step of an image build failed."""

    def __init__(self, step: str, argv: list[str] | None, output_tail: str, hint: str = "") -> None:
        self.step = step
        self.argv = argv
        self.output_tail = output_tail
        cmd = " ".join(argv) if argv else "(internal)"
        msg = f"image build step {step!r} failed\n  command: {cmd}\n  output tail:\n{output_tail}"
        if hint:
            msg += f"\n  hint: {hint}"
        super().__init__(msg)


class HostError(WardenError):
    """The host lacks something warden needs; the message says how to install it."""


class JailUnavailableError(HostError):
    """The jail was required (``--require-jail``, ``require_jail=True``) and this host lacks a
    feature of it. The message names each missing feature, why, and what to do (``warden
    doctor``). Nothing was started: no QEMU, uid claim, mount or runtime dir (HTTP 409 from a
    daemon, which records nothing)."""


JAIL_REFUSED = "the jail is required"
"""How a :class:`JailUnavailableError`'s message begins: the remote SDK knows the daemon's
refusal by it."""


class TooManyConnectionsError(HostError):
    """The daemon has as many client connections open as it allows, in all or from this
    caller (``server/connections.py``). The request did not run: close idle connections, or
    retry later."""


class VMError(WardenError):
    """A VM failed to start, or died."""


class LaunchError(VMError):
    """QEMU failed to launch. Carries the argv, the exit code and the console tail."""

    def __init__(
        self, reason: str, argv: list[str], exit_code: int | None, console_tail: str
    ) -> None:
        self.reason = reason
        self.argv = argv
        self.exit_code = exit_code
        self.console_tail = console_tail
        super().__init__(
            f"{reason}\n  exit code: {exit_code}\n  argv: {argv}\n"
            f"  console tail:\n{console_tail or '(empty)'}"
        )


class AgentTimeoutError(VMError, TimeoutError):
    """The guest agent did not answer within its deadline."""


class AgentUnresponsiveError(AgentTimeoutError):
    """A connected guest agent did not answer a liveness ping or a call within its deadline, or
    stopped reading its channel. The connection was closed: the VM can only be stopped."""


class PausedStateError(VMError):
    """A paused VM's saved state is missing, or failed its seal or its configuration check.
    It was not loaded; the VM stays paused (remove it)."""


class AgentError(WardenError):
    """The guest agent failed or refused an operation."""


class ProtocolError(AgentError):
    """A malformed frame was received; that connection was closed."""


class ChannelAuthError(ProtocolError):
    """The encrypted agent channel refused what it received: a handshake under another secret,
    or a record that was altered, replayed, reordered or truncated. That connection was
    closed; a new one starts a new session."""


class CommandTimeoutError(AgentError, TimeoutError):
    """A command ran past its timeout and was killed. ``result`` holds its partial output."""

    result: object = None


class GuestFileError(AgentError, OSError):
    """A file operation failed inside the guest."""


class SandboxClosedError(WardenError):
    """The sandbox was already killed or closed."""


class SizeLimitError(WardenError):
    """A file copied out of a guest is larger than the caller's ``max_size``. Nothing was kept:
    a partial local file is removed."""


class StoreError(WardenError):
    """The manager's state database (``$WARDEN_HOME/state.db``) refused or failed an operation."""


class NameConflictError(StoreError):
    """A VM with that name exists already (HTTP 409). Nothing was created."""


class VMNotFoundError(StoreError, LookupError):
    """No VM has that id (HTTP 404)."""


class StateTransitionError(StoreError):
    """A VM's state cannot change that way, e.g. ``stopped -> running`` (HTTP 409)."""


class AuthenticationError(WardenError):
    """The request carried no credential, or one that is wrong, expired or revoked (HTTP
    401). The message says which, and how to get a valid one."""


class TokenNotFoundError(WardenError, LookupError):
    """No API token has that id or principal name (HTTP 404); ``warden token list`` lists
    them."""


class PermissionDeniedError(WardenError, PermissionError):
    """The access policy denies the caller this action (HTTP 403). The message names the
    action and the rule that denied it, or says that no rule allows it (``warden policy
    check`` shows it)."""


class GuestOperationRefusedError(PermissionDeniedError):
    """The sandbox's own policy (``[[guest]]`` rules) refuses this guest-agent operation, for
    every caller (HTTP 403)."""


class AdmissionError(WardenError):
    """A create would pass a host limit (HTTP 409). The message names the limit, the numbers
    and the option to change. Nothing was created. ``limits`` names the limits passed
    (``memory``, ``vcpus``, ``cpu_busy``), for code that must not read the message."""

    def __init__(self, message: str, *, limits: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.limits = limits


class TemplateError(WardenError):
    """A template could not be made, found or used; the message says what to do. A template
    that failed to be made leaves nothing behind."""


class TemplateNotFoundError(TemplateError, LookupError):
    """No template has that name (HTTP 404): ``warden template list`` shows them."""


class TemplateRefusedError(TemplateError):
    """A template's seal, image, QEMU or machine no longer matches what loads it (HTTP 409).
    Nothing was started: remove it and make it again (``warden template rm`` / ``create``)."""


class LinkError(WardenError):
    """A VM-to-VM link was refused or broke; nothing was left open on either end."""


class LinkNotFoundError(LinkError, LookupError):
    """No link has that name."""


class PolicyError(WardenError):
    """The access policy (``$WARDEN_HOME/policy.toml``) cannot be used: invalid TOML, an unknown
    key, action or role list. The message names the line or key and what to write. A daemon
    refuses to start with it; a reload keeps the old policy (HTTP 409)."""


class AuditError(WardenError):
    """The tamper-evident audit log (``warden.audit``) refused or failed an operation."""


class AuditRecordError(AuditError, ValueError):
    """A record was refused before anything was written: it is too big, or a field has a bad
    name or type. Put digests in a record, never raw argv, file contents or secrets."""


class AuditLogError(AuditError):
    """The audit log cannot be opened or appended to: its keys are missing or unsafe, another
    process writes it, its last record is unreadable, or the disk failed. The message says
    what to do; ``warden audit verify`` shows the state of the log."""
