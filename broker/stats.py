"""The pool's counters and gauges, each defined once, and how they are reported.

A counter is a field of :class:`Counters` whose metadata gives its help text,
its metric name and its unit; everything that reports counters (``stats()``,
``totals()``, ``pop_stats()``, the Prometheus collector, log lines) reads
that one definition. Counters only grow while a pool lives; ``pop_stats()``
reports differences from marks of its own (:class:`Window`), and the counters
of pools that have stopped are kept by :class:`Totals`.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NotRequired, Protocol, TypedDict

from broker.errors import describe
from broker.histogram import HOLD_BUCKETS, WAIT_BUCKETS, Histogram

__all__ = [
    "COUNTERS",
    "COUNTER_SPECS",
    "GAUGES",
    "CounterSpec",
    "Counters",
    "PoolStats",
    "Totals",
    "Window",
    "render",
]


def _counter(help: str, metric: str, unit: Literal["count", "ms"] = "count") -> Any:
    return field(default=0, metadata={"help": help, "metric": metric, "unit": unit})


@dataclass(slots=True)
class Counters:
    """What happened in one pool since it started; each field only grows.

    The ``_ms`` fields are sums of durations in milliseconds (exported in seconds).
    """

    borrows: float = _counter("Borrows served", "borrows")
    timeouts: float = _counter("Borrows that timed out", "timeouts")
    cancellations: float = _counter("Borrows cancelled while waiting", "cancellations")
    created: float = _counter("Drivers created", "drivers_created")
    closed: float = _counter("Drivers closed", "drivers_closed")
    discarded: float = _counter(
        "Drivers discarded: failed a check, or closed by their borrower", "drivers_discarded"
    )
    errors: float = _counter("Drivers that could not be created", "errors")
    rejected: float = _counter("Borrows refused at once by max_waiting", "rejected")
    requests_queued: float = _counter("Borrows that had to wait", "requests_queued")
    wait_ms: float = _counter("Time borrows spent waiting for a driver", "wait_seconds", "ms")
    usage_ms: float = _counter("Time drivers were held by borrowers", "usage_seconds", "ms")
    connect_ms: float = _counter("Time spent connecting new drivers", "connect_seconds", "ms")
    connect_errors: float = _counter("Connection attempts that failed", "connect_errors")
    returns_bad: float = _counter(
        "Drivers returned after a connection or authentication error", "returns_bad"
    )
    drivers_lost: float = _counter("Drivers that failed a check", "drivers_lost")
    hook_errors: float = _counter("on_create and on_return calls that failed", "hook_errors")

    def add(self, other: Counters | dict[str, float]) -> None:
        """Add ``other``'s counts to these."""
        values = other if isinstance(other, dict) else other.as_dict()
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + values.get(name, 0))

    def as_dict(self) -> dict[str, float]:
        """Every counter by name, unrounded."""
        return {name: getattr(self, name) for name in COUNTERS}


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """One counter as reported: its stats key, help text, metric name and unit."""

    name: str
    help: str
    metric: str
    unit: Literal["count", "ms"]


#: Every counter, in the order they are reported.
COUNTER_SPECS: Final = tuple(
    CounterSpec(f.name, f.metadata["help"], f.metadata["metric"], f.metadata["unit"])
    for f in dataclasses.fields(Counters)
)
#: The counters' stats keys.
COUNTERS: Final = tuple(spec.name for spec in COUNTER_SPECS)

#: Gauges of one pool: stats key -> (metric name, help).
GAUGES: Final = {
    "available": ("pool_available", "Idle drivers ready to be borrowed"),
    "in_use": ("pool_in_use", "Drivers borrowed now"),
    "creating": ("pool_creating", "Drivers being created"),
    "checking": ("pool_checking", "Drivers being health-checked"),
    "closing": ("pool_closing", "Drivers being closed"),
    "total": ("pool_drivers", "Drivers the pool holds (idle, in use, being created or checked)"),
    "waiting": ("pool_waiting", "Borrowers waiting for a driver"),
    "max_size": ("pool_max_size", "Most drivers the pool may hold"),
    "min_size": ("pool_min_size", "Drivers the pool keeps even when idle"),
}


class PoolStats(TypedDict):
    """One loop's pool as ``stats()``, ``stats_sync()`` and ``pop_stats()`` report it."""

    loop: str | None
    thread: str
    state: Literal["open", "closing", "stopped"]
    available: int
    in_use: int
    creating: int
    checking: int
    closing: int
    total: int
    waiting: int
    requests_waiting: int
    ready: int
    max_size: int
    min_size: int
    max_waiting: int
    generation: int
    target: str
    connecting_ms: int
    last_error: str | None
    borrows: int
    timeouts: int
    cancellations: int
    created: int
    closed: int
    discarded: int
    errors: int
    rejected: int
    requests_queued: int
    wait_ms: int
    usage_ms: int
    connect_ms: int
    connect_errors: int
    returns_bad: int
    drivers_lost: int
    hook_errors: int
    #: The longest wait (ms): since the pool started, or since the last pop.
    wait_max_ms: int
    #: The loop's actor answered (or could not be asked: its loop is parked or ours).
    responsive: NotRequired[bool]
    loop_running: NotRequired[bool]
    #: ``str(id(loop))``, as the seed design named a loop's pool.
    loop_id: NotRequired[str]


def shown(value: float) -> int:
    """A counter as reported: durations (ms) rounded to whole milliseconds."""
    return round(value)


class Window:
    """What ``pop_stats()`` has reported of one pool: each count is reported once.

    Counters only grow, so a pop reports what grew past the marks and moves
    them. Pops from several threads at once are serialized by a lock of the
    window's own (never held across I/O), and a pop that read older figures
    than the marks reports nothing rather than a count twice.
    """

    __slots__ = ("__weakref__", "_lock", "_marks", "wait_max_ms")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marks = dict.fromkeys(COUNTERS, 0.0)
        #: The longest wait since the last take (the pool raises it as borrows wait).
        self.wait_max_ms = 0.0

    def take(self, stats: PoolStats) -> PoolStats:
        """``stats`` with each counter since the previous take; move the marks."""
        taken: dict[str, Any] = dict(stats)
        with self._lock:
            marks = self._marks
            for name in COUNTERS:
                value, mark = float(taken[name]), marks[name]
                taken[name] = shown(value - mark) if value > mark else 0
                if value > mark:
                    marks[name] = value
            taken["wait_max_ms"] = shown(self.wait_max_ms)
            self.wait_max_ms = 0.0
        return taken  # type: ignore[return-value]

    def peek(self, stats: PoolStats) -> PoolStats:
        """What :meth:`take` would return, moving nothing."""
        peeked: dict[str, Any] = dict(stats)
        with self._lock:
            for name in COUNTERS:
                peeked[name] = shown(max(0.0, float(peeked[name]) - self._marks[name]))
            peeked["wait_max_ms"] = shown(self.wait_max_ms)
        return peeked  # type: ignore[return-value]

    def unreported(self, counters: dict[str, float]) -> dict[str, float]:
        """What no take has reported yet, and mark it reported."""
        with self._lock:
            left = {name: max(0.0, counters[name] - self._marks[name]) for name in COUNTERS}
            self._marks.update(counters)
        return left


class Counted(Protocol):
    """A pool as the totals read it."""

    counters: Counters
    window: Window
    wait_histogram: Histogram
    hold_histogram: Histogram


class Totals:
    """Counters and histograms summed over every pool a broker ever had.

    A pool's counters move here in one step when it stops, seen by
    :meth:`sums` either before or after, never half done: what they report
    never goes back. What ``pop_stats()`` had not reported of it yet is kept
    for the next pop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retired = Counters()
        self._histograms = new_histograms()
        self._folded: weakref.WeakSet[Any] = weakref.WeakSet()
        self._unpopped = Counters()

    def fold(self, pool: Counted) -> None:
        """A pool stopped: keep its counters for good."""
        with self._lock:
            self._retired.add(pool.counters)
            self._histograms["borrow_wait"].add(pool.wait_histogram)
            self._histograms["hold"].add(pool.hold_histogram)
            self._unpopped.add(pool.window.unreported(pool.counters.as_dict()))
            self._folded.add(pool)

    def sums(self, live: list[Counted]) -> dict[str, int]:
        """Every counter over stopped pools and the ``live`` ones not folded yet."""
        with self._lock:
            sums = Counters()
            sums.add(self._retired)
            for pool in live:
                if pool not in self._folded:
                    sums.add(pool.counters)
        return {name: shown(value) for name, value in sums.as_dict().items()}

    def histograms(self, live: list[Counted]) -> dict[str, Histogram]:
        """Borrow waits and hold times over every pool, as :meth:`sums` counts them."""
        with self._lock:
            merged = {name: h.copy() for name, h in self._histograms.items()}
            for pool in live:
                if pool not in self._folded:
                    merged["borrow_wait"].add(pool.wait_histogram)
                    merged["hold"].add(pool.hold_histogram)
        return merged

    def take_unpopped(self) -> dict[str, int] | None:
        """Counts of stopped pools that no pop reported yet; None if there are none."""
        with self._lock:
            left, self._unpopped = self._unpopped.as_dict(), Counters()
        if not any(left.values()):
            return None
        return {name: shown(value) for name, value in left.items()}


def new_histograms() -> dict[str, Histogram]:
    """Empty histograms of borrow waits (``borrow_wait``) and hold times (``hold``)."""
    return {"borrow_wait": Histogram(WAIT_BUCKETS), "hold": Histogram(HOLD_BUCKETS)}


class Rendered(Protocol):
    """A pool as its stats entry reads it."""

    key: str
    thread_name: str
    max_size: int
    min_size: int
    generation: int
    target: str
    wait_max_ms: float
    counters: Counters

    @property
    def config(self) -> Any: ...

    @property
    def idle(self) -> Sized: ...

    @property
    def in_use(self) -> Sized: ...

    @property
    def connecting(self) -> list[float]: ...

    @property
    def checking(self) -> Sized: ...

    @property
    def closing(self) -> Sized: ...

    @property
    def waiters(self) -> Sized: ...

    @property
    def last_error(self) -> BaseException | None: ...

    def state(self) -> str: ...

    def total(self) -> int: ...


def render(pool: Rendered, now: float) -> PoolStats:
    """One pool's stats entry: its state, its gauges and its counters since it started."""
    oldest = min(pool.connecting, default=None)
    waiting = len(pool.waiters)
    ready = len(pool.idle) + len(pool.in_use)
    stats: dict[str, Any] = {
        "loop": pool.key,
        "thread": pool.thread_name,
        "state": pool.state(),
        "available": len(pool.idle),
        "in_use": len(pool.in_use),
        "creating": len(pool.connecting),
        "checking": len(pool.checking),
        "closing": len(pool.closing),
        "total": pool.total(),
        "waiting": waiting,
        "requests_waiting": waiting,
        "ready": ready,
        "max_size": pool.max_size,
        "min_size": pool.min_size,
        "max_waiting": pool.config.max_waiting,
        "generation": pool.generation,
        "target": pool.target,
        "connecting_ms": 0 if oldest is None else round((now - oldest) * 1000),
        "last_error": None if pool.last_error is None else describe(pool.last_error),
    }
    counters = pool.counters
    for name in COUNTERS:
        stats[name] = shown(getattr(counters, name))
    stats["wait_max_ms"] = shown(pool.wait_max_ms)
    return stats  # type: ignore[return-value]
