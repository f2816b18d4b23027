"""Fixed-bucket histograms of durations, cheap enough for every borrow.

Each pool keeps one for the time borrowers wait and one for the time they
hold a driver. The buckets never reset, so what Prometheus reads from them
never goes back.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Final

__all__ = ["HOLD_BUCKETS", "WAIT_BUCKETS", "Histogram"]

#: Upper bounds (seconds) of the borrow-wait buckets; the last bucket is +Inf.
WAIT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
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
)
#: Upper bounds (seconds) of the hold-time buckets; the last bucket is +Inf.
HOLD_BUCKETS: Final = (
    0.001,
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
    300.0,
)


class Histogram:
    """Counts of observed durations per bucket (upper bounds inclusive), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def observe_zero(self) -> None:
        """Count a duration of zero (a borrow served at once) without a search."""
        self.counts[0] += 1

    @property
    def count(self) -> int:
        """How many durations were counted."""
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        """Add another histogram with the same buckets into this one."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def copy(self) -> Histogram:
        """An independent copy."""
        twin = Histogram(self.bounds)
        twin.counts = list(self.counts)
        twin.sum = self.sum
        return twin

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, count at or below it)`` per bucket, ending with ``inf``."""
        running = 0
        result: list[tuple[float, int]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:.3f}>"
