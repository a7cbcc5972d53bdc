"""A link's shared-memory rings, as one end sees them: the region, its two rings, the doorbell.

The layout is :mod:`warden.wire.ring`'s. This module maps the region (the ``ivshmem-plain``
PCI device 1af4:1110 whose header carries the link's id; outside a VM, a test's file), writes
records into this end's ring and reads the other end's, and polls with backoff (ivshmem-plain
has no interrupts). Standard library and :mod:`warden.wire` only: it runs in the guest.

**The other end is untrusted.** Every value read from the region is checked before use: a
counter of the other end must move forward, stay a multiple of :data:`~warden.wire.ring.ALIGN`
and keep ``head - tail`` within ``[0, CAPACITY]``; a record's header must have a known kind, a
length of at most :data:`~warden.wire.ring.MAX_RECORD` within the bytes in flight and before the
ring's end (a pad exactly to it). Records are copied out of the region before anything looks
at them. Any violation raises :class:`RingError`. Each end keeps its own counters in memory
and only reads the other end's: a peer that overwrites ours only confuses itself.

**Ordering.** The writer copies a record in, then stores its head (one aligned 8-byte store);
the reader loads the head, then copies the record out, then stores its tail. x86 keeps stores
in order and loads in order, so a reader that sees a head sees the bytes before it.

The caller serialises access: :class:`Ring` itself holds no lock (the link holds one around
each call, so that once it closed the region, no thread touches it again).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time

from warden.wire.ring import (
    ALIGN,
    CAPACITY,
    DATA,
    HEAD,
    HEADER,
    HEADER_SIZE,
    KIND_DATA,
    KIND_END,
    KIND_PAD,
    MAX_RECORD,
    RECORD,
    REGION_SIZE,
    TAIL,
    RingLayoutError,
    check_header,
    pad_before,
    span,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PCI_DEVICES = "/sys/bus/pci/devices"
PCI_SLOTS = "/sys/bus/pci/slots"
IVSHMEM = ("0x1af4", "0x1110")
"""vendor, device of ``ivshmem-plain``."""
FIND_TIMEOUT_S = 10.0
"""How long ``link-open`` waits for its region's device to appear (hotplug takes 1-2 s)."""
FIND_POLL_S = 0.05
SPINS = 8
"""Polls at once before the backoff starts yielding."""
YIELD_S = 5e-3
"""How long after it started waiting the backoff polls with only ``sched_yield`` between
polls (in a TCG guest even ``time.sleep(20e-6)`` takes 0.2-0.35 ms, and a ``select`` of 40-250
us took 0.36-0.47 ms p50: the round trip's cost). 5 ms (it was 2) covers a 64-byte round trip
here, so neither end of a ping-pong sleeps: ``bench.links`` round trip ring/relay 0.136-0.272x
in four runs against 0.123-0.329x at 2 ms (docs/benchmarks.md). The price: a reader spins
(yielding) up to 5 ms of its vCPU after each record."""
SLEEP_MIN_S = 20e-6
SLEEP_ACTIVE_S = 250e-6
"""The longest sleep between polls while the ring was busy within :data:`IDLE_AFTER_S`.
250 us (it was 1 ms) took the 64-byte round trip from 0.39-0.40x of the relay's to
0.21-0.37x (three runs), and a waiting reader's CPU from 16% to 34% of its vCPU during that
second
(docs/benchmarks.md, "Links, the shared-memory ring")."""
SLEEP_IDLE_S = 5e-3
"""The longest sleep between polls of a ring idle for :data:`IDLE_AFTER_S`."""
IDLE_AFTER_S = 1.0
QUIET_SLEEPS = ((10.0, 50e-3), (60.0, 0.1))
"""The longest sleep between polls of a ring idle for longer still (seconds idle, sleep).
Each wake-up of a TCG guest costs its QEMU 0.8-1.7 ms of a host core (its main loop wakes ~11
times for one), so an open link whose clients are silent kept its VM at 16% of a core at the
5 ms sleep, 8.5-8.9% at 20 ms and 1.8-1.9% at 100 ms (0.1% without a link). The price: the
first record after such a silence waits up to that sleep more, at each end (a round trip
after 78 s of silence took 82 ms); docs/design.md, "Doorbell"."""
UNPLUG_WAIT_S = 60.0
"""How long the unplugging thread watches a powered-off device go away."""


class RingError(Exception):
    """The other end broke the ring's rules (a bad counter or record header)."""


class Backoff:
    """Polling without a doorbell: a few polls at once, then polls with a ``sched_yield``
    between them (other threads and processes run) for :data:`YIELD_S`, then sleeps from
    :data:`SLEEP_MIN_S` doubling to :data:`SLEEP_ACTIVE_S`, to :data:`SLEEP_IDLE_S` once
    nothing came for :data:`IDLE_AFTER_S`, and longer after :data:`QUIET_SLEEPS`. Only the
    start of each wait spins: an idle link sleeps."""

    def __init__(self) -> None:
        self.waiting_since: float | None = None
        self.polls = 0
        self.delay = SLEEP_MIN_S

    def reset(self) -> None:
        """Something came: the next wait starts fast again."""
        self.waiting_since = None

    def pause(self) -> None:
        """Wait before the next poll."""
        timeout = self.timeout()
        if timeout:
            time.sleep(timeout)

    def timeout(self) -> float:
        """How long to wait before the next poll, in seconds (0: poll again at once); in the
        yielding phase it yields first. For a caller that waits on something else meanwhile
        (a socket) instead of sleeping."""
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since, self.polls, self.delay = now, 0, SLEEP_MIN_S
        self.polls += 1
        if self.polls <= SPINS:
            return 0.0
        if now - self.waiting_since < YIELD_S:
            os.sched_yield()
            return 0.0
        delay = self.delay
        self.delay = min(self.delay * 2, _cap(now - self.waiting_since))
        return delay


def _cap(waited: float) -> float:
    """The longest sleep between polls after ``waited`` seconds without anything."""
    for after, sleep in reversed(QUIET_SLEEPS):
        if waited > after:
            return sleep
    return SLEEP_IDLE_S if waited > IDLE_AFTER_S else SLEEP_ACTIVE_S


class Ring:
    """The region's two rings as end ``role`` sees them: it writes direction 0 (role ``a``)
    or 1 (``b``) and reads the other. Over any writable buffer of :data:`REGION_SIZE` bytes
    (the mapped region; a bytearray in tests) whose counters start at zero."""

    def __init__(self, buffer: mmap.mmap | bytearray, role: str) -> None:
        self.view = memoryview(buffer)
        if len(self.view) < REGION_SIZE:
            self.view.release()
            raise RingLayoutError("the region is smaller than a link's")
        self.counters = self.view[:HEADER_SIZE].cast("Q")
        self.out = 0 if role == "a" else 1
        self.into = 1 - self.out
        self.head = 0
        """Where this end writes next (its head, as it last published it)."""
        self.seen_tail = 0
        """The other end's tail of this end's ring, as last read."""
        self.tail = 0
        """Where this end reads next in the other end's ring (its tail, as published)."""

    def release(self) -> None:
        """Drop the views (before the region is unmapped)."""
        self.counters.release()
        self.view.release()

    # -- this end's ring

    def free(self) -> int:
        """The bytes this end may still write (RingError if the other end's tail is bad)."""
        tail = self.counters[TAIL[self.out] // 8]
        used = self.head - tail
        if tail % ALIGN or tail < self.seen_tail or not 0 <= used <= CAPACITY:
            raise RingError(f"the other end's tail {tail} is impossible (head {self.head})")
        self.seen_tail = tail
        return CAPACITY - used

    def put(self, kind: int, payload: bytes) -> bool:
        """Write one record and publish it; False (nothing written) if it does not fit yet."""
        if len(payload) > MAX_RECORD or kind not in (KIND_DATA, KIND_END):
            raise ValueError(f"a record of kind {kind} and {len(payload)} bytes")
        pad = pad_before(self.head, len(payload))
        size = span(len(payload))
        if pad + size > self.free():
            return False
        base = DATA[self.out]
        at = self.head % CAPACITY
        if pad:
            self.view[base + at : base + at + RECORD.size] = RECORD.pack(
                pad - RECORD.size, KIND_PAD
            )
            at = 0
        self.view[base + at : base + at + RECORD.size] = RECORD.pack(len(payload), kind)
        start = base + at + RECORD.size
        self.view[start : start + len(payload)] = payload
        self.head += pad + size
        self.counters[HEAD[self.out] // 8] = self.head  # after the bytes: publishes them
        return True

    # -- the other end's ring

    def take(self) -> tuple[int, bytes] | None:
        """The next record (kind, a copy of its bytes), its space given back; None if the
        ring is empty; RingError if the other end broke the rules."""
        while True:
            head = self.counters[HEAD[self.into] // 8]
            ready = head - self.tail
            if head % ALIGN or not 0 <= ready <= CAPACITY:
                raise RingError(f"the other end's head {head} is impossible (tail {self.tail})")
            if ready == 0:
                return None
            base = DATA[self.into]
            at = self.tail % CAPACITY
            size, kind = RECORD.unpack(self.view[base + at : base + at + RECORD.size])
            if kind == KIND_PAD:
                if size != CAPACITY - at - RECORD.size or ready < CAPACITY - at:
                    raise RingError(f"a pad record of {size} bytes at {at}")
                self._consumed(CAPACITY - at)
                continue
            if kind not in (KIND_DATA, KIND_END):
                raise RingError(f"a record of unknown kind {kind}")
            if size > MAX_RECORD or span(size) > ready or at + span(size) > CAPACITY:
                raise RingError(f"a record of {size} bytes at {at} with {ready} in flight")
            start = base + at + RECORD.size
            payload = bytes(self.view[start : start + size])  # a copy: the region may change
            self._consumed(span(size))
            return kind, payload

    def _consumed(self, size: int) -> None:
        self.tail += size
        self.counters[TAIL[self.into] // 8] = self.tail


# -- the region


class Region:
    """One mapped region: the mapping, its fd, and what it was found as."""

    def __init__(self, where: str, fd: int, mapping: mmap.mmap, device: bool) -> None:
        self.where = where
        """The device's sysfs directory, or the test's file."""
        self.fd = fd
        self.mapping = mapping
        self.device = device

    def close(self) -> None:
        """Unmap and close (no touch of the region's bytes after this)."""
        self.mapping.close()
        os.close(self.fd)


_CLAIMS_LOCK = threading.Lock()
_CLAIMED: set[str] = set()
"""Regions mapped (or being probed) by a link of this agent: skipped by discovery."""
_RETIRED: set[str] = set()
"""Devices of ended links, powered off and going away: skipped by discovery while they are
there (the host may have truncated the region already: a touch would crash this VM's QEMU)."""


def regions_dir() -> str | None:
    """A directory of region files instead of PCI devices (a test agent outside a VM may set
    WARDEN_LINK_REGIONS; never honoured in a VM's pid 1)."""
    return os.environ.get("WARDEN_LINK_REGIONS") if os.getpid() != 1 else None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def candidates() -> list[str]:
    """Where a link's region may be: the ivshmem devices (or the test's files)."""
    directory = regions_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            return sorted(os.path.join(directory, n) for n in os.listdir(directory))
        return []
    try:
        names = sorted(os.listdir(PCI_DEVICES))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(PCI_DEVICES, name)
        if (_read(f"{path}/vendor"), _read(f"{path}/device")) == IVSHMEM:
            found.append(path)
    return found


def _map(where: str, device: bool) -> Region | None:
    """Map ``where`` (None if it cannot be: not ready yet, or not a region)."""
    path = f"{where}/resource2" if device else where
    try:
        if device:
            with open(f"{where}/enable", "w") as f:
                f.write("1")  # without it, writes to the BAR are lost
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_SYNC if device else 0))
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < REGION_SIZE:
            raise OSError("too small")
        mapping = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        return None
    return Region(where, fd, mapping, device)


def _probe(where: str, link_id: bytes) -> Region | None:
    """``where`` mapped if its header is link ``link_id``'s; else None, nothing left mapped."""
    region = _map(where, device=regions_dir() is None)
    if region is None:
        return None
    try:
        check_header(region.mapping[: HEADER.size], link_id)  # a copy of the header
    except RingLayoutError:
        region.close()
        return None
    return region


def find(link_id: bytes, lock: threading.Lock, stopped: Callable[[], bool]) -> Region | None:
    """Map the region of link ``link_id``, waiting up to :data:`FIND_TIMEOUT_S` for its device;
    None if ``stopped()`` became true first (nothing left mapped). Each probe runs under
    ``lock`` and only while not ``stopped()``. RingLayoutError if none appeared."""
    deadline = time.monotonic() + FIND_TIMEOUT_S
    while True:
        found = candidates()
        with _CLAIMS_LOCK:
            _RETIRED.intersection_update(found)  # those gone are forgotten
        for where in found:
            with _CLAIMS_LOCK:
                if where in _CLAIMED or where in _RETIRED:
                    continue  # another link's of this agent, or one going away
                _CLAIMED.add(where)
            with lock:
                region = None if stopped() else _probe(where, link_id)
            if region is not None:
                return region
            release_claim(where)
        if stopped():
            return None
        if time.monotonic() > deadline:
            raise RingLayoutError(
                f"no shared-memory region of this link appeared within {FIND_TIMEOUT_S:g}s"
            )
        time.sleep(FIND_POLL_S)


def release_claim(where: str) -> None:
    with _CLAIMS_LOCK:
        _CLAIMED.discard(where)


def unplug(region: Region) -> None:
    """After :meth:`Region.close`: power the device's slot off so that QEMU can finish the
    unplug the host asked for (best effort), and keep the device out of discovery until it is
    gone. A test's file is only released."""
    if not region.device:
        release_claim(region.where)
        return
    with _CLAIMS_LOCK:
        _CLAIMED.discard(region.where)
        _RETIRED.add(region.where)
    threading.Thread(
        target=_power_off, args=(region.where,), name="link-unplug", daemon=True
    ).start()


def _power_off(where: str) -> None:
    bus = os.path.basename(where).rsplit(".", 1)[0]  # 0000:01:00.0 -> 0000:01:00
    with contextlib.suppress(OSError):
        for slot in sorted(os.listdir(PCI_SLOTS)):
            if _read(f"{PCI_SLOTS}/{slot}/address") == bus:
                with contextlib.suppress(OSError), open(f"{PCI_SLOTS}/{slot}/power", "w") as f:
                    f.write("0")
                break
    deadline = time.monotonic() + UNPLUG_WAIT_S
    while os.path.exists(where) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not os.path.exists(where):  # else discovery forgets it once it is gone
        with _CLAIMS_LOCK:
            _RETIRED.discard(where)
