"""The names of the agent protocol, declared once for both sides.

Operation names, the keys of request and response objects, error kinds and the guest's users.
Like :mod:`warden.wire.frame` this module does no I/O and uses the standard library only: it is
copied into the guest image, and the host's client and the guest agent both import it instead
of writing string literals.

Plain classes of ``str`` constants rather than enums: importing ``enum`` members by attribute is
cheap, and the JSON payloads carry the plain strings.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_USER",
    "ROOT_UID",
    "USERS",
    "USER_GID",
    "USER_HOME",
    "USER_UID",
    "ErrorKind",
    "Key",
    "Op",
    "User",
]


class Op:
    """Request operations (the ``op`` key of a REQUEST)."""

    PING = "ping"
    INFO = "info"
    EXEC = "exec"
    READ = "read"
    WRITE = "write"
    STAT = "stat"
    LIST = "list"
    REMOVE = "remove"
    MKDIR = "mkdir"
    SHUTDOWN = "shutdown"
    LINK_OPEN = "link-open"
    """Open this VM's end of a link: a unix socket in the guest, records relayed by the host."""
    LINK_CLOSE = "link-close"
    """Close this VM's end of a link (by name), giving a reason."""


class Key:
    """Keys of REQUEST, RESPONSE, ERROR and HELLO objects."""

    # every request
    OP = "op"
    USER = "user"
    # exec
    ARGV = "argv"
    SHELL = "shell"
    ENV = "env"
    CWD = "cwd"
    STDIN = "stdin"
    TIMEOUT = "timeout"
    # files
    PATH = "path"
    MODE = "mode"
    PARENTS = "parents"
    RECURSIVE = "recursive"
    # links (NAME too)
    LINK_KEY = "key"
    """link-open: the link's 32-byte key, hex (never logged)."""
    ROLE = "role"
    """link-open: "a" or "b" (which direction this end sends)."""
    TRANSPORT = "transport"
    """link-open: "relay" (records through the host; the default) or "ring" (shared memory)."""
    LINK_ID = "link_id"
    """link-open, ring: the 16-byte id (hex) in the header of the link's region."""
    PLAIN = "plain"
    """link-open, ring: records carry plaintext (only the host's benchmark asks for it)."""
    REASON = "reason"
    """link-close: why; link-open's response: why the link ended."""
    CLEAN = "clean"
    """link-open's response: true if both directions ended normally (no error)."""
    CLOSED = "closed"
    """link-close's response: whether a link of that name was open."""
    # shutdown
    REBOOT = "reboot"
    # every response and error
    OK = "ok"
    ERROR = "error"
    MESSAGE = "message"
    # exec's response
    EXIT_CODE = "exit_code"
    SIGNAL = "signal"
    TIMED_OUT = "timed_out"
    # files' responses
    SIZE = "size"
    ENTRY = "entry"
    ENTRIES = "entries"
    ERRNO = "errno"
    STRERROR = "strerror"
    # a file entry (stat's ``entry``, list's ``entries``; also PATH, SIZE, MODE)
    NAME = "name"
    TYPE = "type"
    MTIME = "mtime"
    # HELLO
    VERSIONS = "versions"
    VERSION = "version"
    NONCE = "nonce"
    SEED = "seed"
    TIME = "time"
    AGENT = "agent"
    PID = "pid"
    XFER = "xfer"
    REKEY = "rekey"
    """HELLO (host): the VM's new channel secret, hex, for every later handshake."""
    REKEYED = "rekeyed"
    """HELLO (agent): true once it holds the secret that REKEY handed it."""
    XFER_KEY = "xfer_key"
    """HELLO (host): the session's transfer-window key, hex (see warden.channel.window)."""
    HOSTNAME = "hostname"
    """HELLO (host): the guest's hostname (a clone of a template is a new machine: its own)."""
    XFER_READ = "xfer_read"
    """HELLO (agent): true if it can send file reads through the transfer window (a ``read``
    REQUEST then asks for that with ``xfer``: true)."""


class ErrorKind:
    """The ``error`` of an unsuccessful RESPONSE (or of an ERROR frame)."""

    INVALID = "invalid"
    """Bad arguments; the message says which."""
    FILE = "file"
    """An OSError on a guest file; ``errno``, ``strerror`` and ``path`` say which."""
    IO = "io"
    """The transfer window could not be read."""
    CANCELLED = "cancelled"
    AGENT = "agent"
    """An internal error of the agent (logged on the guest console)."""
    PROTOCOL = "protocol"
    """A malformed or unexpected frame (ERROR frames only); the session ends."""


class User:
    """Who an exec or a file operation runs as (the ``user`` key)."""

    USER = "user"
    """The unprivileged workload user (the default)."""
    ROOT = "root"


USERS = (User.USER, User.ROOT)
DEFAULT_USER = User.USER
USER_UID = 1000
USER_GID = 1000
USER_HOME = "/home/user"
ROOT_UID = 0
