"""The base of a request that outlives its REQUEST frame (exec, read, write)."""

from __future__ import annotations

from warden.guest.flow import Credit
from warden.wire.frame import INITIAL_WINDOW

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from warden.guest.session import Session
    from warden.wire.frame import Frame


class Request:
    """A running request: it receives DATA, EOF, WINDOW and CANCEL frames of its id."""

    def __init__(self, session: Session, request_id: int) -> None:
        self.session = session
        self.request_id = request_id
        self.credits: dict[int, Credit] = {}
        """The send credit of each stream this request sends, by channel."""

    def new_credit(self, channel: int, wake: Callable[[], None] | None = None) -> Credit:
        """The credit of a stream this request sends (see :mod:`warden.guest.flow`)."""
        credit = Credit(INITIAL_WINDOW, wake)
        self.credits[channel] = credit
        return credit

    def on_data(self, frame: Frame) -> None:
        """Input on this request (ignored unless the request takes it)."""

    def on_eof(self, frame: Frame) -> None:
        """The end of an input stream of this request."""

    def on_window(self, channel: int, increment: int) -> None:
        """More credit for a stream: ignored for a stream this request does not send."""
        credit = self.credits.get(channel)
        if credit is not None:
            credit.grant(increment)

    def cancel(self) -> None:
        """The host cancelled the request, or the session ended."""

    def close_credits(self) -> None:
        for credit in self.credits.values():
            credit.close()

    def finish(self, response: dict[str, Any], eofs: tuple[int, ...] = ()) -> None:
        """Answer the request (after the EOFs of ``eofs``, in one send) and forget it."""
        self.session.forget(self.request_id)
        self.session.respond(self.request_id, response, eofs)

    def send(self, channel: int, credit: Credit, data: bytes) -> bool:
        """Send ``data`` (at most the credit) on ``channel``; False once the session is gone."""
        credit.spend(len(data))
        return self.session.send_data(self.request_id, channel, data)
