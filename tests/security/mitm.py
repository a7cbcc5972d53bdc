"""A man in the middle of the agent channel, for tests: it sits between an AgentClient and the
unix socket QEMU serves for the VM's agent port, cuts each direction into the channel's
units (the 54-byte handshake message, then records: a u32 big-endian length and a body), and
forwards them, except the ones it was told to attack.

An attack is armed for the *next* record in one direction (:meth:`Mitm.arm`); what happened is
recorded (:attr:`Mitm.sent`, :attr:`Mitm.records`) so a test can check that the attack did
fire. Bytes that do not parse as records (the guest's abort notice, say) are forwarded as they
are from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from warden.channel.noise import TAG_SIZE
from warden.channel.transport import (
    HANDSHAKE_HEADER_SIZE,
    HANDSHAKE_SIZE,
    MAGIC,
    MAX_RECORD,
    RECORD_HEADER_SIZE,
    STATUS_OK,
)

READ_SIZE = 64 * 1024


class Direction(enum.Enum):
    HOST_TO_GUEST = "h2g"
    GUEST_TO_HOST = "g2h"


class Attack(enum.Enum):
    FLIP = "flip"
    """Flip one bit in the middle of the next record's body, forward it."""
    REPLAY = "replay"
    """Send a copy of an earlier record (``record``) right before the next one."""
    SWAP = "swap"
    """Hold the next record back and send it after the one that follows it."""
    TRUNCATE = "truncate"
    """Send the first half of the next record, then carry on with the records after it."""
    CUT = "cut"
    """Send the first half of the next record, drop the rest, and close both connections."""
    INJECT = "inject"
    """Send ``record`` (from another session) in place of the next record."""
    WITHHOLD = "withhold"
    """Keep the next record (in :attr:`Mitm.withheld`) and drop it and all after it."""
    FLIP_HANDSHAKE = "flip-handshake"
    """Flip one bit of the handshake message's ephemeral key (armed before it arrives)."""


@dataclass
class _Armed:
    attack: Attack
    record: bytes | None = None


@dataclass
class _Splitter:
    """Cuts one direction's byte stream into units: handshake messages and notices until the
    handshake message went by, then records; anything unparsable is passed on raw."""

    buf: bytearray = field(default_factory=bytearray)
    handshaken: bool = False
    raw: bool = False

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.buf += data
        units: list[tuple[str, bytes]] = []
        while self.buf:
            unit = self._next()
            if unit is None:
                break
            units.append(unit)
        return units

    def _next(self) -> tuple[str, bytes] | None:
        if self.raw:
            return self._take("raw", len(self.buf))
        return self._next_record() if self.handshaken else self._next_handshake()

    def _next_handshake(self) -> tuple[str, bytes] | None:
        buf = self.buf
        start = buf.find(MAGIC)
        if start != 0:  # stale bytes first (keep what may be the start of a magic)
            end = start if start > 0 else len(buf) - (len(MAGIC) - 1)
            return self._take("raw", end) if end > 0 else None
        if len(buf) < HANDSHAKE_HEADER_SIZE:
            return None
        if buf[HANDSHAKE_HEADER_SIZE - 1] != STATUS_OK:  # a refusal or an abort notice
            return self._take("notice", HANDSHAKE_HEADER_SIZE)
        if len(buf) < HANDSHAKE_SIZE:
            return None
        self.handshaken = True
        return self._take("handshake", HANDSHAKE_SIZE)

    def _next_record(self) -> tuple[str, bytes] | None:
        buf = self.buf
        if len(buf) < RECORD_HEADER_SIZE:
            return None
        (length,) = struct.unpack_from(">I", buf)
        if TAG_SIZE <= length <= MAX_RECORD:
            size = RECORD_HEADER_SIZE + length
            return self._take("record", size) if len(buf) >= size else None
        # Not a record: the guest's abort notice, say. Raw from here on, the notice in one piece.
        if buf.startswith(MAGIC) and len(buf) < HANDSHAKE_HEADER_SIZE:
            return None
        self.raw = True
        return self._take("raw", len(buf))

    def _take(self, kind: str, size: int) -> tuple[str, bytes]:
        unit = bytes(self.buf[:size])
        del self.buf[:size]
        return kind, unit


def flip_bit(record: bytes) -> bytes:
    """``record`` with one bit of its body (the ciphertext, not the length) flipped."""
    body_middle = RECORD_HEADER_SIZE + (len(record) - RECORD_HEADER_SIZE) // 2
    out = bytearray(record)
    out[body_middle] ^= 0x01
    return bytes(out)


class Mitm:
    """Relays between a client (:meth:`client_streams`) and the agent socket ``upstream``."""

    def __init__(self, upstream: Path) -> None:
        self.upstream = upstream
        self.records: dict[Direction, list[bytes]] = {d: [] for d in Direction}
        """Every record that arrived, per direction, in order (index = the nonce its sender
        sealed it with)."""
        self.handshakes: dict[Direction, bytes] = {}
        """The handshake message each way, as it arrived."""
        self.notices: list[bytes] = []
        """What came after the handshake message but did not parse as records (from the
        guest: its abort notice, and whatever followed it)."""
        self.early_notices: list[bytes] = []
        """Refusals and abort notices before the handshake message (from the guest: a
        refusal of ours, or the end of a session an earlier host left behind)."""
        self.sent: dict[Direction, list[tuple[str, bytes]]] = {d: [] for d in Direction}
        """What went on to the other side, per direction: (what, bytes)."""
        self.fired: list[Attack] = []
        """The attacks that were carried out."""
        self.withheld: bytes | None = None
        self._armed: dict[Direction, _Armed | None] = {d: None for d in Direction}
        self._held: bytes | None = None
        self._dropping: set[Direction] = set()
        """Directions whose records are dropped from now on (after a cut or a withheld one)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []
        """The relay's own ends: to the agent socket, and its end of the client's pair."""
        self._client_writer: asyncio.StreamWriter | None = None

    def arm(self, direction: Direction, attack: Attack, record: bytes | None = None) -> None:
        """Attack the next record (or handshake message) going ``direction``."""
        if attack in (Attack.REPLAY, Attack.INJECT) and record is None:
            raise ValueError(f"{attack.value} needs the record to send")
        self._armed[direction] = _Armed(attack, record)

    @contextlib.asynccontextmanager
    async def client_streams(
        self,
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """Connect to the agent socket and yield the streams for the client's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except BaseException:
            ours.close()
            theirs.close()
            raise
        host_reader, host_writer = await asyncio.open_unix_connection(sock=ours)
        client_reader, client_writer = await asyncio.open_unix_connection(sock=theirs)
        self._writers = [up_writer, host_writer]
        self._client_writer = client_writer
        self._tasks = [
            asyncio.create_task(self._pump(Direction.HOST_TO_GUEST, host_reader, up_writer)),
            asyncio.create_task(self._pump(Direction.GUEST_TO_HOST, up_reader, host_writer)),
        ]
        try:
            yield client_reader, client_writer
        finally:
            await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        writers = [*self._writers, *([self._client_writer] if self._client_writer else [])]
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def _shut(self) -> None:
        """Close both connections (without waiting: called from a pump)."""
        for writer in self._writers:
            writer.close()

    async def _pump(
        self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        splitter = _Splitter()
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for kind, unit in splitter.feed(data):
                    out = self._relay(direction, kind, unit)
                    if writer.is_closing():
                        return
                    if out:
                        writer.write(out)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._shut()  # one side gone: the other goes too, as through a real relay

    def _relay(self, direction: Direction, kind: str, unit: bytes) -> bytes:
        """What to send on for ``unit`` (b"" for nothing)."""
        sent = self.sent[direction]
        if kind == "handshake":
            self.handshakes[direction] = unit
            armed = self._armed[direction]
            if armed is not None and armed.attack is Attack.FLIP_HANDSHAKE:
                self._armed[direction] = None
                self.fired.append(armed.attack)
                tampered = bytearray(unit)
                tampered[HANDSHAKE_HEADER_SIZE + 5] ^= 0x01  # in the ephemeral key
                unit = bytes(tampered)
                kind = "flipped handshake"
            sent.append((kind, unit))
            return unit
        if kind != "record":
            if unit.startswith(MAGIC):
                late = direction in self.handshakes
                (self.notices if late else self.early_notices).append(unit)
            sent.append((kind, unit))
            return unit
        self.records[direction].append(unit)
        if direction in self._dropping:
            return b""
        out = self._attack(direction, unit)
        return b"".join(piece for _, piece in out)

    def _attack(self, direction: Direction, record: bytes) -> list[tuple[str, bytes]]:
        sent = self.sent[direction]
        if self._held is not None:  # the second of a swapped pair: it goes first
            held, self._held = self._held, None
            pair = [("swapped", record), ("held back", held)]
            sent.extend(pair)
            return pair
        armed = self._armed[direction]
        if armed is None or armed.attack is Attack.FLIP_HANDSHAKE:
            sent.append(("record", record))
            return [("record", record)]
        self._armed[direction] = None
        self.fired.append(armed.attack)
        attack = armed.attack
        half = record[: len(record) // 2]
        out: list[tuple[str, bytes]] = []
        if attack is Attack.FLIP:
            out = [("flipped", flip_bit(record))]
        elif attack is Attack.REPLAY:
            assert armed.record is not None
            out = [("replayed", armed.record), ("record", record)]
        elif attack is Attack.SWAP:
            self._held = record
        elif attack is Attack.TRUNCATE:
            out = [("truncated", half)]
        elif attack is Attack.CUT:
            out = [("truncated", half)]
            self._dropping.add(direction)
            asyncio.get_running_loop().call_later(0.5, self._shut)  # once the half is out
        elif attack is Attack.INJECT:
            assert armed.record is not None
            out = [("injected", armed.record)]
        else:  # WITHHOLD
            self.withheld = record
            self._dropping.add(direction)
        sent.extend(out)
        return out
