"""What one event loop's pool holds, and how it reads; its decisions are in :mod:`broker.pool`.

The drivers in each state (idle, in use, being created, checked or closed),
the waiting callers, the current sizes and the counters. Nothing here
decides anything: :class:`~broker.pool.Pool` does, on top of this.
"""

from __future__ import annotations

import contextvars
from typing import Any

from broker.config import Neo4jConnectionConfig, redact_uri
from broker.creations import Creations
from broker.effects import Effects
from broker.histogram import HOLD_BUCKETS, WAIT_BUCKETS, Histogram
from broker.messages import Borrow, CheckNow, WaitReady
from broker.pooled import PooledDriver
from broker.queues import IdleDrivers, Waiters
from broker.stats import Counters, PoolStats, Window, render

__all__ = ["CheckBatch", "PoolState", "Stopping"]


class Stopping:
    """Why the pool is closing, and when drivers still in use are closed anyway."""

    __slots__ = ("deadline", "reason")

    def __init__(self, reason: str, deadline: float) -> None:
        self.reason = reason
        self.deadline = deadline


class CheckBatch:
    """One ``check()`` call: the drivers it still waits for, and how many failed."""

    __slots__ = ("discarded", "remaining", "request")

    def __init__(self, request: CheckNow, drivers: set[PooledDriver]) -> None:
        self.request = request
        self.remaining = drivers
        self.discarded = 0


class PoolState:
    """The drivers of one loop, its waiting callers, its sizes and its counters.

    ``sizes`` (min, max, version) and ``generation`` start from the broker's
    current values (they may have been changed by a resize or a drain
    before this pool was born).
    """

    def __init__(
        self,
        config: Neo4jConnectionConfig,
        effects: Effects,
        key: str,
        thread_name: str,
        *,
        sizes: tuple[int, int, int] | None = None,
        generation: int = 0,
    ) -> None:
        self.config = config
        self.key = key
        self.thread_name = thread_name
        self._effects = effects
        self.min_size, self.max_size, self.sizes_version = sizes or (
            config.pool_min_size,
            config.pool_max_size,
            0,
        )
        #: Drivers made before this drain generation are replaced.
        self.generation = generation
        self.target = redact_uri(config.uri)
        self.idle = IdleDrivers()
        #: Drivers handed out, with the borrowing task (to notice abandoned ones).
        self.in_use: dict[PooledDriver, Any] = {}
        self.creations = Creations()
        self.checking: set[PooledDriver] = set()
        #: Drivers being closed, with the reason and whether it counts as a discard.
        self.closing: dict[PooledDriver, tuple[str, bool]] = {}
        self.waiters = Waiters(self._skip_cancelled)
        self.ready_waiters: list[WaitReady] = []
        self.check_batches: list[CheckBatch] = []
        self.stopping: Stopping | None = None
        #: Set by the actor once it has stopped for good.
        self.stopped = False
        self.counters = Counters()
        self.wait_max_ms = 0.0
        self.wait_histogram = Histogram(WAIT_BUCKETS)
        self.hold_histogram = Histogram(HOLD_BUCKETS)
        #: What ``pop_stats()`` has reported so far.
        self.window = Window()

    def is_closing(self, pooled: PooledDriver) -> bool:
        """Whether a close of ``pooled`` is under way."""
        return pooled in self.closing

    def _skip_cancelled(self, borrow: Borrow) -> None:
        """A borrower cancelled while it waited leaves the queue unserved."""
        self._effects.forget(borrow)
        self.counters.cancellations += 1

    def _create(self, context: contextvars.Context | None, now: float, verify: bool = True) -> None:
        self.creations.begin(now)
        self._effects.start_create(context, self.generation, now, verify)

    def _check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        self.checking.add(pooled)
        self._effects.start_check(pooled, hook, verify)

    def _close(self, pooled: PooledDriver, reason: str, discarded: bool = False) -> None:
        self.closing[pooled] = (reason, discarded)
        self._effects.start_close(pooled)

    # -- reading ---------------------------------------------------------------

    @property
    def connecting(self) -> list[float]:
        """When each creation still running started."""
        return self.creations.started

    @property
    def last_error(self) -> BaseException | None:
        """The last creation error, until a creation succeeds."""
        return self.creations.last_error

    @property
    def failing_since(self) -> float | None:
        """Since when creations fail with no success in between."""
        return self.creations.failing_since

    def total(self) -> int:
        """Drivers that count against the maximum: idle, in use, being created or checked."""
        return len(self.idle) + len(self.in_use) + len(self.creations.started) + len(self.checking)

    def is_ready(self) -> bool:
        """Whether the pool holds ``min_size`` verified drivers (idle or in use)."""
        return len(self.idle) + len(self.in_use) >= self.min_size

    def is_empty(self) -> bool:
        """Nothing left to close or wait for."""
        return self.total() == 0 and not self.closing

    def state(self) -> str:
        """``open``, ``closing`` or ``stopped``."""
        if self.stopped:
            return "stopped"
        return "open" if self.stopping is None else "closing"

    def snapshot(self, now: float) -> PoolStats:
        """The pool's state, and its counters since it started.

        Other threads read it too (stats of a parked or busy loop): each
        figure is read once and the read never fails, though figures read
        that way may come from slightly different moments.
        """
        return render(self, now)

    def pop_stats(self, now: float) -> PoolStats:
        """:meth:`snapshot` with the counters since the previous call, which resets them.

        Only this view is reset: :meth:`snapshot`, the totals and the
        histograms keep growing (a Prometheus counter never goes back).
        """
        return self.window.take(self.snapshot(now))

    def peek_stats(self, now: float) -> PoolStats:
        """What :meth:`pop_stats` would return, without resetting anything."""
        return self.window.peek(self.snapshot(now))

    def log_fields(self) -> dict[str, Any]:
        """The loop key, thread name and pool counters every event carries."""
        return {
            "loop": self.key,
            "thread": self.thread_name,
            "available": len(self.idle),
            "in_use": len(self.in_use),
            "creating": len(self.creations.started),
            "waiting": len(self.waiters),
            "total": self.total(),
        }
