"""File reads through the transfer window: the host's account of the slots it lends to reads.

A read that goes through the window (guest -> host) works like a write the other way round
(see ``Channel.XFER_READ`` in :mod:`warden.wire.frame`):

1. The host lends a few free slots of the window to the read: a reference (offset, slot
   size) for each, on ``XFER_READ``.
2. The agent writes a piece of the file into a lent slot and sends a reference (offset,
   length and, on the encrypted channel, the piece's tag) on ``XFER_READ``.
3. The host's consumer takes the piece: the host reads it from the window file, checks its
   tag, hands it on, and lends the slot again.

The guest is hostile, so a reference is accepted only for a slot lent to that read and not
holding a piece already, with a length of at most a slot; anything else ends the session
before the window file is read. A slot lent to a read goes back to the window's free slots
only once the guest cannot write into it any more: a lent slot when the read's RESPONSE came
(the agent writes nothing after it), a filled one when its piece is taken, or dropped by a
consumer that left early.

Each piece is numbered in the order its reference arrived (one sequence per session, for the
pieces of every read), and its tag is checked under that number and the read's request id
with the reads' key (``warden.channel.window.reads_key``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from warden._errors import ChannelAuthError
from warden.channel.window import WindowAuth
from warden.wire.frame import FrameError, decode_xfer_ref, encode_xfer_ref, xfer_ref_tag

__all__ = ["FOR_WRITES", "READ_SLOTS", "ReadSlots"]

READ_SLOTS = 4
"""How many slots of the window one read may hold at once (lent or filled)."""
FOR_WRITES = 4
"""Slots that reads leave to writes: a write never waits for a read's caller (who may be the
same task, holding the read open while it writes)."""


class _State(Enum):
    LENT = "lent"
    """The agent may write a piece into it."""
    FILLED = "filled"
    """It holds a piece the host has not taken yet."""


@dataclass
class _Slot:
    request_id: int
    state: _State
    length: int = 0
    sequence: int = 0
    tag: bytes = b""


class ReadSlots:
    """The slots of one window lent to reads, and the pieces in them.

    ``window_size``: the window file's size; ``auth``: checks the pieces' tags (None on a
    plaintext channel, whose pieces carry none); ``free(offset)``: gives a slot back to the
    window's free slots.
    """

    def __init__(
        self,
        window_size: int,
        slot_size: int,
        auth: WindowAuth | None,
        free: Callable[[int], None],
    ) -> None:
        self.window_size = window_size
        self.slot_size = slot_size
        self.auth = auth
        self._slots: dict[int, _Slot] = {}
        """offset -> the read it is lent to, for every slot lent to a read."""
        self._done: set[int] = set()
        """Reads whose RESPONSE came while they still held a filled slot."""
        self._left: set[int] = set()
        """Reads whose consumer left while they still held a lent slot."""
        self._free = free
        """Gives a slot back to the window's free slots."""
        self._sequence = 0
        """Piece references received in this session: the sequence number of the next one."""

    @property
    def count(self) -> int:
        """How many slots all reads hold."""
        return len(self._slots)

    def held(self, request_id: int) -> int:
        """How many slots the read holds (lent or filled)."""
        return sum(1 for slot in self._slots.values() if slot.request_id == request_id)

    def lend(self, request_id: int, offset: int) -> bytes:
        """Lend the free slot at ``offset`` to a read; the reference to send to the agent."""
        self._slots[offset] = _Slot(request_id, _State.LENT)
        return encode_xfer_ref(offset, self.slot_size)

    def accept(self, request_id: int, payload: bytes) -> tuple[int, str | None]:
        """The agent's reference to a piece: (its offset, what is wrong with it, if anything).

        A good one fills its slot and takes the next sequence number (and frees the slot at
        once if the read's consumer left).
        """
        try:
            offset, length = decode_xfer_ref(payload)
        except FrameError as exc:
            return -1, str(exc)
        tag = xfer_ref_tag(payload)
        slot = self._slots.get(offset)
        if slot is None or slot.request_id != request_id or slot.state is not _State.LENT:
            return -1, (
                f"a transfer window piece at offset {offset} on request {request_id}, in a "
                "slot not lent to that read (or holding a piece already)"
            )
        if length > self.slot_size or offset + length > self.window_size:
            return -1, (
                f"a transfer window piece of {length} bytes at offset {offset}, beyond its "
                f"slot ({self.slot_size} bytes) or the window ({self.window_size} bytes)"
            )
        if (self.auth is None) != (not tag):
            return -1, "a transfer window piece with a tag missing, or one not expected"
        slot.state, slot.length, slot.tag = _State.FILLED, length, tag
        slot.sequence = self._sequence
        self._sequence += 1
        if request_id in self._left:
            self._free_slot(request_id, offset)
        return offset, None

    def take(self, fd: int, request_id: int, offset: int, who: str) -> bytes:
        """The piece in the filled slot at ``offset``, read from the window file ``fd`` and
        checked. Raises ChannelAuthError if its tag does not authenticate it."""
        slot = self._slots.get(offset)
        if slot is None or slot.request_id != request_id or slot.state is not _State.FILLED:
            raise ValueError(f"no piece of request {request_id} at offset {offset}")
        data = os.pread(fd, slot.length, offset)
        if len(data) != slot.length:
            raise ChannelAuthError(
                f"a transfer window piece of {who} is short: {len(data)} of {slot.length} bytes"
            )
        if self.auth is not None and not self.auth.check(request_id, slot.sequence, data, slot.tag):
            raise ChannelAuthError(
                f"piece {slot.sequence} of a file read from {who} failed authentication: the "
                "window's bytes were altered, swapped or replayed; nothing of it was used"
            )
        return data

    def after_take(self, request_id: int, offset: int) -> bytes | None:
        """The piece at ``offset`` was taken: lend its slot again (the reference to send), or
        None if the read is over and the slot is free again."""
        if request_id in self._done:
            self._free_slot(request_id, offset)
            return None
        slot = self._slots[offset]
        slot.state, slot.length, slot.tag = _State.LENT, 0, b""
        return encode_xfer_ref(offset, self.slot_size)

    def answered(self, request_id: int) -> None:
        """The read's RESPONSE came: the agent writes no more. Its lent slots are free."""
        self._release(request_id, _State.LENT)
        if self.held(request_id):
            self._done.add(request_id)

    def abandoned(self, request_id: int) -> None:
        """The consumer left the read: its filled slots are free (the agent may still write
        into the lent ones until its RESPONSE; they are free then)."""
        self._release(request_id, _State.FILLED)
        if self.held(request_id):
            self._left.add(request_id)

    def _release(self, request_id: int, state: _State) -> None:
        offsets = [
            offset
            for offset, slot in self._slots.items()
            if slot.request_id == request_id and slot.state is state
        ]
        for offset in offsets:
            self._free_slot(request_id, offset)

    def _free_slot(self, request_id: int, offset: int) -> None:
        del self._slots[offset]
        self._free(offset)
        if not self.held(request_id):
            self._done.discard(request_id)
            self._left.discard(request_id)
