"""The host's side of the encrypted agent channel, under :class:`~warden.agent.client.AgentClient`.

The client's frames run inside the channel of :mod:`warden.channel.transport`: the host sends
its handshake message as soon as it connects, waits for the agent's answer (found among any
stale bytes the agent sent an earlier host), and from then on seals every frame it sends into
records and opens every record it reads. Anything that fails there (a refused handshake, a
record that was altered, replayed, reordered or truncated, the agent's notice that a record
of ours failed) raises :class:`~warden.ChannelAuthError`, and the client closes the
connection; a new connection starts a new session with a new handshake.

A host that takes over a running VM (a manager restarted after kill -9) cannot know where the
earlier host's stream stopped: the agent may be in the middle of one of its records. So it
first sends :data:`RESYNC_PADDING` zero bytes: they complete any such record, which then fails
authentication, and the agent hunts for a handshake from there, skipping the zeros.
"""

from __future__ import annotations

import asyncio

from warden._errors import ChannelAuthError
from warden.channel.errors import ChannelError
from warden.channel.transport import (
    MAX_RECORD,
    RECORD_HEADER_SIZE,
    Initiator,
    Session,
    describe_abort,
)

__all__ = ["RESYNC_PADDING", "ChannelLayer"]

RESYNC_PADDING = RECORD_HEADER_SIZE + MAX_RECORD
"""Zero bytes that complete any record an earlier host left half-sent."""
SKIPPED_ANSWER_GRACE_S = 2.0
"""How long the host still waits for the answer to its handshake after an answer that was not
its own (a stale one, or its own altered on the way) before it gives up with ChannelAuthError."""


class ChannelLayer:
    """Seals and opens the bytes of one connection; made per connection with the VM's secret."""

    def __init__(self, secret: bytes, who: str) -> None:
        self._initiator: Initiator | None = Initiator(secret)
        self._session: Session | None = None
        self._who = who
        self._give_up: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the handshake completed (or failed: then it holds the error)."""

    @property
    def established(self) -> bool:
        return self._session is not None

    def opening(self, *, resync: bool) -> bytes:
        """What to send first: the handshake message, after the padding if ``resync``."""
        assert self._initiator is not None
        padding = bytes(RESYNC_PADDING) if resync else b""
        return padding + self._initiator.data_to_send()

    def seal(self, frames: bytes) -> bytes:
        """The records that carry ``frames``. Only once :attr:`ready`."""
        if self._session is None:
            raise RuntimeError("the channel handshake is not complete")
        try:
            return self._session.seal(frames)
        except ChannelError as exc:  # only a worn-out nonce: 2**64 records
            raise ChannelAuthError(f"the channel to {self._who} failed: {exc}") from None

    def open(self, data: bytes) -> bytes:
        """The plaintext in ``data`` (b"" while the handshake is still going on). Raises
        ChannelAuthError, and fails :attr:`ready` if the handshake did."""
        if self._session is None:
            data = self._handshake(data)
            if self._session is None:
                return b""
        try:
            return self._session.feed(data)
        except ChannelError as exc:
            reason = describe_abort(self._session.unread) or str(exc)
            raise ChannelAuthError(
                f"the channel to {self._who} failed: {reason}. The connection was closed; a new "
                "one starts a new session"
            ) from None

    def fail(self, error: BaseException) -> None:
        """The connection ended before the handshake completed."""
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: the caller may have given up already

    def _skipped_only(self) -> None:
        """No answer of ours came after one that did not authenticate: most likely ours,
        altered on the way."""
        assert self._initiator is not None
        self.fail(
            ChannelAuthError(
                f"the channel handshake with {self._who} failed: its answer did not "
                f"authenticate ({self._initiator.skipped[0]}): it was altered on the way, or "
                "the guest holds another secret for this VM. If this persists, stop and remove "
                "the VM"
            )
        )

    def _handshake(self, data: bytes) -> bytes:
        assert self._initiator is not None
        try:
            session = self._initiator.receive(data)
        except ChannelError as exc:
            error = ChannelAuthError(
                f"the channel handshake with {self._who} failed: {exc}. Nothing was sent to "
                "it; if this persists, stop and remove the VM"
            )
            self.fail(error)
            raise ChannelAuthError(*error.args) from None
        if session is None:
            if self._initiator.skipped and self._give_up is None:
                loop = asyncio.get_running_loop()
                self._give_up = loop.call_later(SKIPPED_ANSWER_GRACE_S, self._skipped_only)
            return b""
        if self._give_up is not None:
            self._give_up.cancel()
        self._session = session
        rest, self._initiator = self._initiator.rest, None
        if not self.ready.done():
            self.ready.set_result(None)
        return rest
