"""The daemon's Prometheus metrics, written by hand in the text exposition format (0.0.4).

No client library: a counter, a histogram, and :meth:`Metrics.render`, which also takes the
gauges computed at scrape time (VMs by state, reservations)::

    warden_vms{state="running"} 3
    warden_create_seconds_bucket{outcome="ok",le="0.5"} 2
    warden_bytes_total{direction="files_in"} 1048576
    warden_admission_refusals_total 1

Everything runs on the event loop of the daemon, so nothing here takes a lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Counter:
    """A monotonically increasing count, per label set."""

    def __init__(self, name: str, help_text: str, *, initial: Iterable[Labels] = ((),)) -> None:
        self.name = name
        self.help = help_text
        self.values: dict[Labels, float] = dict.fromkeys(initial, 0.0)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = _header(self.name, "counter", self.help)
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(key)} {_number(value)}")
        return lines


class Histogram:
    """Observations in cumulative buckets, with their sum and count, per label set."""

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        counts = self._counts.get(tuple(sorted(labels.items())))
        return counts[-1] if counts else 0

    def render(self) -> list[str]:
        lines = _header(self.name, "histogram", self.help)
        for key in sorted(self._counts):
            counts = self._counts[key]
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                lines.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {n}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(self._sums[key])}")
            lines.append(f"{self.name}_count{_labels(key)} {counts[-1]}")
        return lines


def gauge(name: str, help_text: str, values: Mapping[Labels, float]) -> list[str]:
    lines = _header(name, "gauge", help_text)
    for key, value in sorted(values.items()):
        lines.append(f"{name}{_labels(key)} {_number(value)}")
    return lines


BYTE_DIRECTIONS = ("files_in", "files_out", "exec_stdin", "exec_stdout", "exec_stderr")


class Metrics:
    """The daemon's metrics; ``render`` adds the gauges its caller computes at scrape time."""

    def __init__(self) -> None:
        self.create_seconds = Histogram(
            "warden_create_seconds",
            "Time to create a VM through the API (admission, boot or restore), by outcome.",
        )
        self.exec_seconds = Histogram(
            "warden_exec_seconds",
            "Time from an exec request to the command's result, by outcome.",
        )
        self.bytes = Counter(
            "warden_bytes_total",
            "Bytes moved between clients and guests: files_in (uploads), files_out "
            "(downloads), exec_stdout and exec_stderr.",
            initial=[(("direction", d),) for d in BYTE_DIRECTIONS],
        )
        self.refusals = Counter(
            "warden_admission_refusals_total", "Creates refused by admission control."
        )
        self.refusals_by_limit = Counter(
            "warden_admission_refusals_by_limit_total",
            "Creates refused by admission control, by each limit they would pass "
            "(a create passing several counts under each).",
            initial=[(("limit", "memory"),), (("limit", "vcpus"),), (("limit", "cpu_busy"),)],
        )

    def refused(self, limits: Sequence[str]) -> None:
        """A create refused by admission for passing ``limits`` (``AdmissionError.limits``)."""
        self.refusals.inc()
        for limit in limits:
            self.refusals_by_limit.inc(limit=limit)

    def render(self, *, gauges: Sequence[list[str]] = ()) -> str:
        lines: list[str] = []
        for block in gauges:
            lines.extend(block)
        for metric in (
            self.create_seconds,
            self.exec_seconds,
            self.bytes,
            self.refusals,
            self.refusals_by_limit,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
