"""The ring's record framing (wire/ring.py, guest/ring.py) over a bytearray: wrap, pad, order;
and the region's discovery."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from warden.guest import ring
from warden.guest.ring import (
    IVSHMEM,
    QUIET_SLEEPS,
    SLEEP_ACTIVE_S,
    YIELD_S,
    Backoff,
    Ring,
)
from warden.wire.ring import (
    ALIGN,
    CAPACITY,
    DATA,
    HEAD,
    KIND_DATA,
    KIND_END,
    KIND_PAD,
    MAX_RECORD,
    RECORD,
    REGION_SIZE,
    TAIL,
    RingLayoutError,
    pack_header,
    pad_before,
    span,
)


@given(st.integers(0, MAX_RECORD))
def test_span_is_the_header_and_the_padded_bytes(size: int) -> None:
    assert span(size) % ALIGN == 0
    assert RECORD.size + size <= span(size) < RECORD.size + size + ALIGN


@given(st.integers(0, 1 << 40).map(lambda n: n * ALIGN), st.integers(0, MAX_RECORD))
def test_a_record_never_wraps(head: int, size: int) -> None:
    pad = pad_before(head, size)
    at = (head + pad) % CAPACITY
    assert at + span(size) <= CAPACITY
    if pad:
        assert pad == CAPACITY - head % CAPACITY and pad >= RECORD.size
        assert head % CAPACITY + span(size) > CAPACITY


def _pair() -> tuple[bytearray, Ring, Ring]:
    region = bytearray(REGION_SIZE)
    return region, Ring(region, "a"), Ring(region, "b")


_SIZES = st.one_of(
    st.integers(0, 64), st.integers(MAX_RECORD // 2, MAX_RECORD), st.just(MAX_RECORD)
)
_OPS = st.lists(
    st.tuples(st.sampled_from(["put", "put", "take"]), _SIZES), min_size=20, max_size=100
)


@settings(max_examples=100, deadline=None)
@given(_OPS, st.integers(0, 255))
def test_records_come_out_in_order_whatever_the_wrap(ops: list[tuple[str, int]], seed: int) -> None:
    """A model check: what a puts, b takes, in order, whole; put refuses exactly when the
    record (and its pad) would not fit."""
    region, a, b = _pair()
    sent: deque[bytes] = deque()
    in_flight = 0
    for n, (op, size) in enumerate(ops):
        if op == "put":
            payload = bytes([(seed + n) % 256]) * size
            pad = pad_before(a.head, size)
            fits = in_flight + pad + span(size) <= CAPACITY
            assert a.put(KIND_DATA, payload) is fits
            if fits:
                sent.append(payload)
                in_flight += pad + span(size)
        else:
            got = b.take()
            assert got == ((KIND_DATA, sent.popleft()) if sent else None)
            in_flight = a.head - b.tail
            assert in_flight or not sent  # a pad only ever comes with the record after it
        assert 0 <= a.head - b.tail <= CAPACITY
        assert region[HEAD[0] : HEAD[0] + 8] == a.head.to_bytes(8, "little")
    while sent:
        assert b.take() == (KIND_DATA, sent.popleft())
    assert b.take() is None
    event("wrapped" if a.head > CAPACITY else "not wrapped")


def test_both_directions_are_independent() -> None:
    _, a, b = _pair()
    assert a.put(KIND_DATA, b"to b") and b.put(KIND_DATA, b"to a")
    assert a.put(KIND_END, b"")
    assert b.take() == (KIND_DATA, b"to b") and b.take() == (KIND_END, b"")
    assert a.take() == (KIND_DATA, b"to a") and a.take() is None


def test_a_full_ring_refuses_until_read_and_the_pad_is_written_at_the_wrap() -> None:
    region, a, b = _pair()
    n = 0
    while a.put(KIND_DATA, bytes(MAX_RECORD)):
        n += 1
    assert n == CAPACITY // span(MAX_RECORD)
    assert b.take() is not None  # room for one more, which needs a pad at the ring's end
    assert a.put(KIND_DATA, bytes(MAX_RECORD))
    at = n * span(MAX_RECORD)
    size, kind = RECORD.unpack_from(region, DATA[0] + at)
    assert (size, kind) == (CAPACITY - at - RECORD.size, KIND_PAD)
    for _ in range(n):
        assert b.take() == (KIND_DATA, bytes(MAX_RECORD))
    assert b.take() is None
    assert b.tail == a.head and int.from_bytes(region[TAIL[0] : TAIL[0] + 8], "little") == a.head


def test_put_refuses_what_is_not_a_record() -> None:
    _, a, _ = _pair()
    with pytest.raises(ValueError):
        a.put(KIND_DATA, bytes(MAX_RECORD + 1))
    with pytest.raises(ValueError):
        a.put(KIND_PAD, b"")


def test_the_backoff_sleeps_longer_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    now = [0.0]
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    yielded: list[None] = []
    monkeypatch.setattr("os.sched_yield", lambda: yielded.append(None))
    backoff = Backoff()
    for _ in range(20):
        backoff.pause()  # 8 polls at once, then yields while under YIELD_S
    assert not slept and len(yielded) == 12
    now[0] = YIELD_S + 0.001
    for _ in range(30):
        backoff.pause()
    assert len(slept) == 30 and slept[0] == 20e-6 and max(slept) == SLEEP_ACTIVE_S < 5e-3
    now[0] = 2.0
    for _ in range(8):  # doubling from the active cap up to the idle one
        backoff.pause()
    assert max(slept) == 5e-3
    for after, sleep in QUIET_SLEEPS:  # and longer after a long silence
        now[0] = after + 0.001
        for _ in range(6):  # doubling up to it
            backoff.pause()
        assert max(slept) == sleep > 5e-3
    backoff.reset()
    slept.clear()
    for _ in range(9):
        backoff.pause()
    now[0] += YIELD_S + 0.001
    backoff.pause()
    assert slept == [20e-6]


@pytest.mark.parametrize("setsize", [1024, 0])
def test_a_pump_waits_on_its_client_with_select_or_poll(
    monkeypatch: pytest.MonkeyPatch, setsize: int
) -> None:
    """A ring end's wait (``ringlink._ready``): ``select`` below FD_SETSIZE, ``poll`` above
    (forced here with a set size of 0); both report the same readiness and honour the timeout."""
    import contextlib
    import socket

    from warden.guest import ringlink

    monkeypatch.setattr(ringlink, "_FD_SETSIZE", setsize)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        while True:  # fill the socket: not writable any more
            try:
                ours.send(bytes(65536))
            except BlockingIOError:
                break
        fd = ours.fileno()
        start = time.monotonic()
        assert ringlink._ready([fd], [fd], 0.05) == ([], [])
        assert time.monotonic() - start >= 0.04
        theirs.send(b"x")
        assert ringlink._ready([fd], [fd], 1.0) == ([fd], [])
        theirs.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while theirs.recv(1 << 20):  # drain it: writable again
                pass
        assert ringlink._ready([], [fd], 1.0) == ([], [fd])


# -- discovery of the region among PCI devices (a fake sysfs: the real one is the VM tests')


def _device(root: Path, name: str, link_id: bytes, ids: tuple[str, str] = IVSHMEM) -> Path:
    path = root / "devices" / name
    path.mkdir(parents=True)
    (path / "vendor").write_text(ids[0] + "\n")
    (path / "device").write_text(ids[1] + "\n")
    (path / "enable").write_text("0\n")
    with open(path / "resource2", "wb") as f:
        f.write(pack_header(link_id))
        f.truncate(REGION_SIZE)
    return path


def test_discovery_maps_this_links_device_then_powers_its_slot_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WARDEN_LINK_REGIONS", raising=False)
    monkeypatch.setattr(ring, "PCI_DEVICES", str(tmp_path / "devices"))
    monkeypatch.setattr(ring, "PCI_SLOTS", str(tmp_path / "slots"))
    monkeypatch.setattr(ring, "FIND_TIMEOUT_S", 0.2)
    mine, other = os.urandom(16), os.urandom(16)
    _device(tmp_path, "0000:00:02.0", mine, ("0x1af4", "0x1000"))  # virtio, not ivshmem
    _device(tmp_path, "0000:02:00.0", other)
    dev = _device(tmp_path, "0000:01:00.0", mine)
    slot = tmp_path / "slots" / "1"
    slot.mkdir(parents=True)
    (slot / "address").write_text("0000:01:00\n")
    lock = threading.Lock()
    region = ring.find(mine, lock, lambda: False)
    assert region is not None and region.where == str(dev)
    assert (dev / "enable").read_text() == "1"
    with pytest.raises(RingLayoutError, match="no shared-memory region"):
        ring.find(mine, lock, lambda: False)  # mapped by an open link: skipped
    assert ring.find(mine, lock, lambda: True) is None
    region.close()
    ring.unplug(region)
    for _ in range(100):
        if (slot / "power").exists() and (slot / "power").read_text() == "0":
            break
        time.sleep(0.01)
    assert (slot / "power").read_text() == "0"
    with pytest.raises(RingLayoutError):
        ring.find(mine, lock, lambda: False)  # going away: never touched again
    shutil.rmtree(dev)  # the guest's kernel removed it
    time.sleep(0.1)
    dev = _device(tmp_path, "0000:01:00.0", mine)  # a new device in the same slot
    region = ring.find(mine, lock, lambda: False)
    assert region is not None and region.where == str(dev)
    region.close()
    ring.release_claim(region.where)
