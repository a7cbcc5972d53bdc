"""The agent channel on the wire: a handshake each way, then encrypted records.

No I/O: the caller moves the bytes (sans-I/O, like :mod:`warden.wire.frame`). The host is the
*initiator*, the guest agent the *responder*. Both hold the VM's 32-byte secret, the Noise
``psk``::

    host:  hs = Handshake(psk, initiator=True)     guest: hs = Handshake(psk, initiator=False)
           send(hs.data_to_send())                        rest = hs.receive(read())
           rest = hs.receive(read())  # until complete    send(hs.data_to_send())
           session = hs.session()                         session = hs.session()
           plaintext = session.feed(rest)                 plaintext = session.feed(rest)

then ``send(session.seal(plaintext))`` and ``session.feed(read())`` for as long as the session
lives. :meth:`Handshake.receive` returns the bytes that followed the handshake message (they
belong to the session) once the handshake is complete, ``b""`` before. After a failed
:meth:`Handshake.receive`, :meth:`Handshake.data_to_send` may hold a refusal for the peer:
send it, it is what makes the error on the other side a clear one.

Handshake messages (one each way; the initiator's first)::

    magic    4 bytes  b"WDNC"
    version  u8       CHANNEL_VERSION, the version of this format and of the handshake
    status   u8       0 OK, then the Noise message; 1 REFUSED_VERSION or 2 REFUSED_AUTH, then
                      nothing (a responder's refusal: see below)
    noise    48 bytes the Noise_NNpsk0_25519_ChaChaPoly_SHA256 handshake message with an empty
                      payload: an ephemeral X25519 public key (32) and the payload's tag (16)

Magic, version and status are the "negotiation data" of Noise section 13, sent before the
handshake message; the magic and version are also the prologue (Noise section 6), so a man in
the middle who changes them makes the handshake fail. A responder that receives another
version answers REFUSED_VERSION with its own version in the header; one whose first message
does not authenticate (another psk, or an altered message) answers REFUSED_AUTH. Refusals are
not authenticated (nothing can be before the handshake): they only make the initiator's error
precise, and an attacker who can forge one could as well cut the connection.

Records (after the handshake, each way)::

    length      u32 big-endian, 16 <= length <= 65535 (MAX_RECORD)
    ciphertext  a Noise transport message (section 5): ChaCha20-Poly1305 of at most 65519 bytes
                of plaintext (MAX_RECORD_PLAINTEXT), its 16-byte tag appended

A record's nonce is not on the wire: it is the count of records before it in that direction
(Noise section 5.1), so each direction's counter strictly increases and a replayed, reordered
or dropped record fails authentication, as does an altered one or one from another session
(other keys). 65535 is Noise's limit on a message (section 3); :meth:`Session.seal` cuts
longer plaintext into several records, and the plaintext is one byte stream in each
direction (the framing of :mod:`warden.wire.frame` runs on top of it). A length over 65535 is
refused when its header arrives, so a peer cannot make the reader buffer more than one record.
A stream that ends inside a record is caught by :meth:`Session.eof`. A stream cut at a record
boundary is the layer above's to notice (Noise section 13, "session termination"): the
framing's requests end with explicit RESPONSE or ERROR frames.

Every refusal raises :class:`~warden.channel.errors.ChannelError`, and the session (or the
handshake) is dead from then on: every later call raises ChannelError again. The host then
starts a new session with a new handshake.
"""

from __future__ import annotations

import os
import struct

from warden.channel.errors import ChannelError
from warden.channel.noise import (
    DHLEN,
    MAX_MESSAGE,
    MAX_NONCE,
    PSK_SIZE,
    TAG_SIZE,
    CipherState,
    HandshakeState,
)

# Not ``typing.TYPE_CHECKING``: importing typing is slow in the guest (see wire/frame.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from warden.channel.evp import EvpChaCha20Poly1305

__all__ = [
    "CHANNEL_VERSION",
    "MAGIC",
    "MAX_RECORD",
    "MAX_RECORD_PLAINTEXT",
    "PATTERN",
    "PROLOGUE",
    "Handshake",
    "Initiator",
    "Responder",
    "Session",
    "abort_notice",
    "describe_abort",
]

CHANNEL_VERSION = 1
"""The version of the handshake and record format. A peer of another version is refused."""

PATTERN = "NNpsk0"
MAGIC = b"WDNC"
PROLOGUE = MAGIC + bytes([CHANNEL_VERSION])

STATUS_OK = 0
STATUS_REFUSED_VERSION = 1
STATUS_REFUSED_AUTH = 2
STATUS_ABORTED = 3
"""Not in a handshake: the responder's notice that it ended the session because a record
failed (it then waits for a new handshake). Unauthenticated, like a refusal."""

_HEADER = struct.Struct(">4sBB")  # magic, version, status
HANDSHAKE_HEADER_SIZE = _HEADER.size  # 6
NOISE_MESSAGE_SIZE = DHLEN + TAG_SIZE  # an "e" and an empty payload's tag, both ways
HANDSHAKE_SIZE = HANDSHAKE_HEADER_SIZE + NOISE_MESSAGE_SIZE  # 54

_LENGTH = struct.Struct(">I")
RECORD_HEADER_SIZE = _LENGTH.size  # 4
MAX_RECORD = MAX_MESSAGE
MAX_RECORD_PLAINTEXT = MAX_RECORD - TAG_SIZE  # 65519

_REMEDY = "both sides must run the same warden release (rebuild the guest image or update warden)"


class Handshake:
    """One side of the channel's handshake (NNpsk0 with the VM's secret as the psk)."""

    __slots__ = ("_buf", "_error", "_noise", "_out", "_session", "initiator")

    def __init__(self, psk: bytes, *, initiator: bool, ephemeral: bytes | None = None) -> None:
        if len(psk) != PSK_SIZE:
            raise ValueError(f"the channel secret is {PSK_SIZE} bytes, not {len(psk)}")
        self.initiator = initiator
        self._noise = HandshakeState(
            initiator=initiator,
            psk=bytes(psk),
            prologue=PROLOGUE,
            pattern=PATTERN,
            ephemeral=ephemeral,  # see Initiator; None: a fresh one
        )
        self._buf = bytearray()
        self._out = bytearray()
        self._error: str | None = None
        self._session: Session | None = None
        if initiator:  # -> psk, e
            self._out += _header(STATUS_OK) + self._noise.write_message(b"")

    @property
    def complete(self) -> bool:
        """Whether the handshake is done: :meth:`session` is ready."""
        return self._session is not None

    def data_to_send(self) -> bytes:
        """The bytes this side must send now (and forgets them): its handshake message, or a
        refusal after a failed :meth:`receive`."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def session(self) -> Session:
        """The session that the completed handshake set up."""
        if self._session is None:
            raise RuntimeError("the handshake is not complete")
        return self._session

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take bytes from the peer. Once the peer's handshake message is complete, returns the
        bytes after it (the start of the session's records); ``b""`` until then."""
        if self._error is not None:
            raise ChannelError(f"the handshake already failed: {self._error}")
        if self._session is not None:
            raise RuntimeError("the handshake is complete: feed the session")
        self._buf += data
        try:
            return self._step()
        except ChannelError as exc:
            self._error = str(exc)
            self._buf.clear()
            raise

    def _step(self) -> bytes:
        buf = self._buf
        if len(buf) < HANDSHAKE_HEADER_SIZE:
            return b""
        self._check_header(*_HEADER.unpack_from(buf))
        if len(buf) < HANDSHAKE_SIZE:
            return b""
        self._read_noise(bytes(buf[HANDSHAKE_HEADER_SIZE:HANDSHAKE_SIZE]))
        rest = bytes(buf[HANDSHAKE_SIZE:])
        buf.clear()
        return rest

    def _check_header(self, magic: bytes, version: int, status: int) -> None:
        if magic != MAGIC:
            raise ChannelError(
                f"the peer did not begin a warden channel handshake (it sent {magic.hex()}, "
                f"not {MAGIC.hex()}): it may be a warden from before the encrypted channel; "
                f"{_REMEDY}"
            )
        if version != CHANNEL_VERSION:
            if not self.initiator:
                self._out += _header(STATUS_REFUSED_VERSION)
            raise ChannelError(
                f"the peer speaks channel version {version}, this side version "
                f"{CHANNEL_VERSION}: {_REMEDY}"
            )
        if status == STATUS_OK:
            return
        if self.initiator and status == STATUS_REFUSED_AUTH:
            raise ChannelError(
                "the peer refused the handshake: the two sides hold different secrets for "
                "this VM, or the handshake was altered on the way"
            )
        raise ChannelError(f"the peer sent a handshake with the invalid status {status}")

    def _read_noise(self, message: bytes) -> None:
        try:
            self._noise.read_message(message)
        except ChannelError as exc:
            if not self.initiator:
                self._out += _header(STATUS_REFUSED_AUTH)
            raise ChannelError(
                f"the handshake failed ({exc}): the two sides hold different secrets for this "
                "VM, or the handshake was altered on the way"
            ) from None
        if not self.initiator:  # <- e, ee
            self._out += _header(STATUS_OK) + self._noise.write_message(b"")
        send, receive = self._noise.split()
        if not self.initiator:
            send, receive = receive, send
        self._session = Session(send, receive, self._noise.handshake_hash)


def _header(status: int) -> bytes:
    return _HEADER.pack(MAGIC, CHANNEL_VERSION, status)


class Session:
    """The records of one channel session, after its handshake: made by :class:`Handshake`.

    :meth:`seal` encrypts this side's plaintext into records; :meth:`feed` takes the peer's
    records as they arrive (in any pieces) and returns their plaintext. :attr:`handshake_hash`
    identifies the session (Noise section 11.2, channel binding).
    """

    __slots__ = ("_buf", "_error", "_receive", "_send", "handshake_hash", "unread")

    def __init__(self, send: CipherState, receive: CipherState, handshake_hash: bytes) -> None:
        self._send = send
        self._receive = receive
        self.handshake_hash = handshake_hash
        self._buf = bytearray()
        self._error: str | None = None
        self.unread = b""
        """After :meth:`feed` refused a record: the bytes from that record's start on, which
        may hold a new handshake (a new host's, after the old one died mid-stream)."""

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete record are held."""
        return len(self._buf)

    @property
    def alive(self) -> bool:
        """False once the session refused something: every call then raises."""
        return self._error is None

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The records that carry ``plaintext`` (none for an empty one), to send in order."""
        self._check_alive()
        data = bytes(plaintext)
        evp = self._send.evp
        if evp is not None and data:
            try:
                return _seal_in_place(evp, self._send, data)
            except ChannelError as exc:
                self._die(str(exc))
        out: list[bytes] = []
        pack = _LENGTH.pack
        encrypt = self._send.encrypt_with_ad
        try:
            for start in range(0, len(data), MAX_RECORD_PLAINTEXT):
                ciphertext = encrypt(b"", data[start : start + MAX_RECORD_PLAINTEXT])
                out += (pack(len(ciphertext)), ciphertext)
        except ChannelError as exc:
            self._die(str(exc))
        return b"".join(out)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """The plaintext of the complete records in ``data`` (and what was buffered before).

        An incomplete record at the end is buffered for the next call. A record that is
        altered, replayed, reordered, oversized, or from another session raises ChannelError,
        and the session is dead."""
        self._check_alive()
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data  # parse straight from the caller's buffer, keep only the tail
        with memoryview(src) as view:
            plaintexts, pos, problem = self._parse(view)
            if problem is not None:
                self.unread = bytes(view[pos:])
            elif src is not buf:
                buf += view[pos:]
        if problem is not None:
            self._die(problem)
        if src is buf:
            del buf[:pos]
        return plaintexts[0] if len(plaintexts) == 1 else b"".join(plaintexts)

    def eof(self) -> None:
        """The peer's stream ended: ChannelError if it ended inside a record."""
        self._check_alive()
        if self._buf:
            self._die(f"the stream ended inside a record ({len(self._buf)} bytes of it arrived)")

    def _parse(self, view: memoryview) -> tuple[list[bytes], int, str | None]:
        """The plaintexts of the complete records at the start of ``view``, the offset after
        them, and what is wrong with the next record (None if nothing)."""
        plaintexts: list[bytes] = []
        pos = 0
        size = len(view)
        decrypt = self._receive.decrypt_with_ad
        while size - pos >= RECORD_HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(view, pos)
            problem = _check_length(length)
            if problem is not None:
                return plaintexts, pos, problem
            start = pos + RECORD_HEADER_SIZE
            end = start + length
            if end > size:
                break
            try:
                plaintexts.append(decrypt(b"", bytes(view[start:end])))
            except ChannelError as exc:
                return plaintexts, pos, self._record_problem(exc)
            pos = end
        return plaintexts, pos, None

    def _record_problem(self, exc: ChannelError) -> str:
        number = self._receive.n  # not incremented by the failed record
        if number >= MAX_NONCE:
            return str(exc)
        return (
            f"record {number} failed authentication: it was altered, replayed, reordered or "
            "truncated, or it belongs to another session"
        )

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ChannelError(f"the channel session is dead after an earlier error: {self._error}")

    def _die(self, problem: str) -> NoReturn:
        self._error = problem
        self._buf.clear()
        raise ChannelError(problem)


def _seal_in_place(evp: EvpChaCha20Poly1305, cipher: CipherState, data: bytes) -> bytes:
    """:meth:`Session.seal` through :mod:`.evp` (the guest's): every record encrypted straight
    from ``data`` into one buffer, which is copied out once. The same bytes as the general
    path (``tests/unit/test_channel_evp.py``), with fewer copies and calls."""
    import ctypes

    count = -(-len(data) // MAX_RECORD_PLAINTEXT)
    out = ctypes.create_string_buffer(len(data) + count * (RECORD_HEADER_SIZE + TAG_SIZE))
    source = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert source is not None
    pos = 0
    for start in range(0, len(data), MAX_RECORD_PLAINTEXT):
        length = min(MAX_RECORD_PLAINTEXT, len(data) - start)
        _LENGTH.pack_into(out, pos, length + TAG_SIZE)
        evp.encrypt_into(cipher.take_nonce(), source + start, length, out, pos + RECORD_HEADER_SIZE)
        pos += RECORD_HEADER_SIZE + length + TAG_SIZE
    return out.raw


def _check_length(length: int) -> str | None:
    if length > MAX_RECORD:
        return f"a record of {length} bytes exceeds the maximum of {MAX_RECORD}"
    if length < TAG_SIZE:
        return f"a record of {length} bytes is shorter than its {TAG_SIZE}-byte tag"
    return None


class Responder:
    """The guest's side of a new session: finds the host's handshake message in a stream that
    may begin with stale bytes (what an earlier host left), answers it, and sets up the session.

    Bytes before the magic are dropped; at most one handshake message is buffered. A message
    that fails (another secret, another version, garbage that happened to hold the magic) is
    answered with a refusal (:meth:`data_to_send`), noted in :attr:`failures`, and the hunt goes
    on after its magic.
    """

    __slots__ = ("_buf", "_on_message", "_out", "_psk", "failures", "rest")

    def __init__(self, psk: bytes, on_message: Callable[[bytes], object] | None = None) -> None:
        if len(psk) != PSK_SIZE:
            raise ValueError(f"the channel secret is {PSK_SIZE} bytes, not {len(psk)}")
        self._psk = bytes(psk)
        self._on_message = on_message
        """Called with each complete handshake message before it is answered (the guest mixes
        it into its kernel RNG, so that clones of one snapshot answer with other keys)."""
        self._buf = bytearray()
        self._out = bytearray()
        self.failures: list[str] = []
        """Why each refused handshake message failed (the caller logs and clears them)."""
        self.rest = b""
        """Once a session is set up: the bytes that followed the handshake (its records)."""

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes | bytearray | memoryview) -> Session | None:
        """Take bytes from the host; the new session once a handshake succeeded, else None."""
        buf = self._buf
        buf += data
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                del buf[: max(0, len(buf) - (len(MAGIC) - 1))]  # keep a partial magic
                return None
            del buf[:start]
            if len(buf) < HANDSHAKE_SIZE:
                return None
            if self._on_message is not None:
                self._on_message(bytes(buf[:HANDSHAKE_SIZE]))
            handshake = Handshake(self._psk, initiator=False)
            try:
                handshake.receive(bytes(buf[:HANDSHAKE_SIZE]))
            except ChannelError as exc:
                self.failures.append(str(exc))
                self._out += handshake.data_to_send()
                del buf[: len(MAGIC)]
                continue
            self._out += handshake.data_to_send()
            self.rest = bytes(buf[HANDSHAKE_SIZE:])
            buf.clear()
            return handshake.session()


class Initiator:
    """The host's side of a new session: its handshake message, then the guest's answer, found
    in a stream that may begin with stale bytes (records the guest sent to an earlier host,
    abort notices, even the guest's answer to an earlier host's handshake that it read late).

    An answer that does not authenticate is skipped, and the hunt goes on: the host re-runs
    its own first message from the same ephemeral key (made for this session only) to read the
    next candidate with a fresh state. A refusal is final, unless an answer follows it in the
    same bytes. Nothing but garbage is buffered beyond one handshake message.
    """

    __slots__ = ("_buf", "_ephemeral", "_failure", "_handshake", "_psk", "rest", "skipped")

    def __init__(self, psk: bytes) -> None:
        self._psk = bytes(psk)
        self._ephemeral = os.urandom(DHLEN)
        self._handshake = Handshake(psk, initiator=True, ephemeral=self._ephemeral)
        self._buf = bytearray()
        self._failure: ChannelError | None = None
        self.rest = b""
        """Once the session is set up: the bytes that followed the answer (its records)."""
        self.skipped: list[str] = []
        """Why each answer that was skipped as not ours failed: if no answer of ours follows,
        ours was probably altered on the way (the caller decides when to give up)."""

    def data_to_send(self) -> bytes:
        return self._handshake.data_to_send()

    def receive(self, data: bytes | bytearray | memoryview) -> Session | None:
        """Take bytes from the guest; the session once its answer arrived, else None. Raises
        ChannelError if the guest refused the handshake (a refusal with no answer after it)."""
        buf = self._buf
        buf += data
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                del buf[: max(0, len(buf) - (len(MAGIC) - 1))]
                break
            del buf[:start]
            if len(buf) < HANDSHAKE_SIZE and not self._is_short_notice(buf):
                break
            session = self._try(bytes(buf[:HANDSHAKE_SIZE]))
            if session is not None:
                self.rest = bytes(buf[HANDSHAKE_SIZE:])
                buf.clear()
                return session
            del buf[: len(MAGIC)]  # not our answer: hunt on after it
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return None

    @staticmethod
    def _is_short_notice(buf: bytearray) -> bool:
        """A refusal or abort notice: a header with no Noise message after it."""
        return len(buf) >= HANDSHAKE_HEADER_SIZE and buf[5] != STATUS_OK

    def _try(self, message: bytes) -> Session | None:
        """Read ``message`` as the answer; None (and a fresh state) if it is not ours."""
        if message[5] == STATUS_ABORTED:
            return None  # the guest ending an earlier host's session
        try:
            self._handshake.receive(message)
        except ChannelError as exc:
            if message[5] != STATUS_OK:  # a refusal: final unless an answer follows
                self._failure = exc
            else:
                self.skipped.append(str(exc))
            self._handshake = Handshake(self._psk, initiator=True, ephemeral=self._ephemeral)
            self._handshake.data_to_send()  # already sent
            return None
        self._failure = None
        return self._handshake.session() if self._handshake.complete else None


def abort_notice() -> bytes:
    """What the responder sends after it ended a session because a record failed."""
    return _header(STATUS_ABORTED)


def describe_abort(unread: bytes) -> str | None:
    """If ``unread`` (a refused record's bytes, :attr:`Session.unread`) is the responder's
    :func:`abort_notice`, why the peer ended the session; else None."""
    if unread[:HANDSHAKE_HEADER_SIZE] != _header(STATUS_ABORTED):
        return None
    return (
        "the guest agent ended the session: a record from the host failed authentication "
        "(it was altered, replayed, reordered or truncated on the way)"
    )
