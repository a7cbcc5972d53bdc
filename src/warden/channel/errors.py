"""The one exception of the channel: :class:`ChannelError`."""

from __future__ import annotations

__all__ = ["ChannelError"]


class ChannelError(Exception):
    """The channel refused its input, or is dead after an earlier refusal.

    Every failure caused by what the peer (or anything between the two sides) sent raises this:
    a handshake that does not authenticate, a peer of another channel version, a record that is
    altered, replayed, reordered, truncated, oversized or from another session. A
    :class:`~warden.channel.transport.Session` that raised it once raises it on every later call.
    Not a ``ValueError``: code that catches bad arguments must not swallow an attack.
    """
