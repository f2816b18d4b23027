"""One event loop's pool: what it holds, and every decision about it.

Plain code, with no event loop and no I/O, so each decision can be read and
tested on its own. The actor (:mod:`broker.actor`) tells the pool what
happened (a borrow, a return, the report of a job, the clock) and the pool
decides who is served next, what is created, checked or closed, and keeps
the counters. It has the actor carry out each decision through
:class:`Effects`: start a job, answer a caller, log an event.

What the pool decides, in one place each:

- who is served next: :meth:`Pool.dispatch` (first come, first served;
  idle drivers due for a check are verified first);
- backpressure: :meth:`Pool.borrow` refuses a borrow that would queue beyond
  ``max_waiting``;
- what grows: :meth:`Pool.dispatch` (for waiters), :meth:`Pool.tick` and
  :meth:`Pool.wait_ready` (up to the minimum), never beyond ``max_size``;
- what closes: :meth:`Pool._retire_reason` for every driver that comes back
  from a borrower or a job (closing, drained, over the bound after a resize,
  too old, handed out ``max_borrows`` times), :meth:`Pool.tick` for idle ones;
- resize bounds and drain generations: :meth:`Pool.resize`,
  :meth:`Pool.drain`;
- the counters and timing stats: :meth:`Pool.snapshot`, :meth:`Pool.pop_stats`.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from typing import Any, Final, Protocol

from broker import log
from broker.config import Neo4jConnectionConfig, redact_uri
from broker.connection import PooledDriver
from broker.errors import BorrowTimeout, BrokerClosed, TooManyWaiters
from broker.histogram import HOLD_BUCKETS, WAIT_BUCKETS, Histogram
from broker.messages import Borrow, CheckNow, Request, WaitReady

__all__ = ["COUNTERS", "CheckBatch", "Effects", "Pool", "Stopping", "describe"]

#: Counters that only grow while a pool lives: summed over loops by
#: ``Broker.totals()``, counted since the last call by ``Broker.pop_stats()``.
#: The ``_ms`` ones are sums of durations in milliseconds.
COUNTERS: Final = (
    "borrows",
    "timeouts",
    "cancellations",
    "created",
    "closed",
    "discarded",
    "errors",
    "rejected",
    "requests_queued",
    "wait_ms",
    "usage_ms",
    "connect_ms",
    "connect_errors",
    "returns_bad",
    "drivers_lost",
    "hook_errors",
)

_MISSING: Any = object()
_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 30.0


class Effects(Protocol):
    """What the pool has its actor do (jobs report back with a message)."""

    def start_create(
        self, context: contextvars.Context | None, generation: int, started: float, verify: bool
    ) -> None:
        """Start a job that makes, verifies (if ``verify``) and prepares a new driver."""

    def start_check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        """Start a job that runs ``on_return`` (``hook``) and verifies ``pooled``.

        Without ``verify``, the driver is verified only if the hook fails.
        """

    def start_close(self, pooled: PooledDriver) -> None:
        """Start a job that closes ``pooled``."""

    def resolve(self, request: Request, value: Any) -> None:
        """Answer a waiting caller: a driver, a number, or None."""

    def refuse(self, request: Request, error: BaseException) -> None:
        """Fail a waiting caller with ``error``."""

    def forget(self, request: Request) -> None:
        """A cancelled caller left the queue: drop what the actor kept for it."""

    def reconnect_failed(self, stats: dict[str, Any]) -> None:
        """Tell the application the pool stayed below its minimum too long."""

    def emit(
        self, level: int, event: str, context: contextvars.Context | None = None, **fields: Any
    ) -> None:
        """Log an event of this pool."""


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


class Pool:
    """The drivers of one loop, its waiting callers, and its counters.

    Every method takes the time (``time.monotonic()``) from its caller, so
    tests drive the clock. ``min_size``, ``max_size`` and ``generation``
    start from the broker's current values (they may have been changed by a
    resize or a drain before this pool was born).
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
        min_size, max_size, version = sizes or (config.pool_min_size, config.pool_max_size, 0)
        self.min_size = min_size
        self.max_size = max_size
        self.sizes_version = version
        #: Drivers made before this drain generation are replaced.
        self.generation = generation
        self.target = redact_uri(config.uri)
        self.idle: deque[PooledDriver] = deque()  # least recently used on the left
        #: Drivers handed out, with the borrowing task (to notice abandoned ones).
        self.in_use: dict[PooledDriver, Any] = {}
        #: When each creation still running started.
        self.connecting: list[float] = []
        self.checking: set[PooledDriver] = set()
        #: Drivers being closed, with the reason and whether it counts as a discard.
        self.closing: dict[PooledDriver, tuple[str, bool]] = {}
        self.waiters: deque[Borrow] = deque()
        self.ready_waiters: list[WaitReady] = []
        self.check_batches: list[CheckBatch] = []
        self.stopping: Stopping | None = None
        #: Set by the actor once it has stopped for good.
        self.stopped = False
        self._refill_at = 0.0
        self._refill_backoff = 0.0
        #: The last creation error, until a creation succeeds.
        self.last_error: BaseException | None = None
        #: Since when creations fail with no success in between (for reconnect_failed).
        self.failing_since: float | None = None
        # Counters since the pool started (see COUNTERS).
        self.borrows = 0
        self.timeouts = 0
        self.cancellations = 0
        self.created = 0
        self.closed = 0
        self.discarded = 0
        self.errors = 0
        self.rejected = 0
        self.requests_queued = 0
        self.wait_ms = 0.0
        self.usage_ms = 0.0
        self.connect_ms = 0.0
        self.connect_errors = 0
        self.returns_bad = 0
        self.drivers_lost = 0
        self.hook_errors = 0
        self.wait_max_ms = 0.0
        self.wait_histogram = Histogram(WAIT_BUCKETS)
        self.hold_histogram = Histogram(HOLD_BUCKETS)
        # What pop_stats() reported last, and the longest wait since.
        self._popped = dict.fromkeys(COUNTERS, 0.0)
        self._window_wait_max_ms = 0.0

    # -- callers -------------------------------------------------------------

    def borrow(self, borrow: Borrow, now: float) -> None:
        """A borrower asks for a driver: serve it now, queue it (and grow), or refuse it."""
        if self.stopping is not None:
            self._effects.refuse(borrow, BrokerClosed(f"the pool of loop {self.key} is closing"))
            return
        waiters = self.waiters
        limit = self.config.max_waiting
        # Waiters and idle drivers never coexist (dispatch pairs them off), so
        # a full queue means nothing could serve this borrower now either.
        if limit and len(waiters) >= limit:
            self.rejected += 1
            self._effects.refuse(
                borrow,
                TooManyWaiters(
                    f"{len(waiters)} borrowers already wait for a driver of loop {self.key} "
                    f"(max_waiting={limit})"
                ),
            )
            self._effects.emit(log.INFO, "borrow.rejected", max_waiting=limit)
            return
        borrow.queued_at = now
        idle = self.idle
        if not waiters and idle and not borrow.waiter.done():
            # Nobody ahead and a driver idle: what dispatch() would do, directly.
            pooled = idle[-1]
            if not pooled.needs_check(now, self.config.health_check_interval):
                idle.pop()
                self._give(pooled, borrow, now)
                return
        waiters.append(borrow)
        self.dispatch(now)
        if borrow.pending():
            self.requests_queued += 1

    def wait_ready(self, request: WaitReady, now: float) -> None:
        """Answer once the pool holds ``min_size`` verified drivers; start them now."""
        if self.stopping is not None:
            self._effects.refuse(request, BrokerClosed(f"the pool of loop {self.key} is closing"))
            return
        if self.is_ready():
            self._effects.resolve(request, None)
            return
        self.ready_waiters.append(request)
        while self.total() < self.min_size:
            self._create(None, now)

    def check_all(self, request: CheckNow, now: float) -> None:
        """Verify every idle driver now; answer with how many were discarded."""
        if self.stopping is not None:
            self._effects.refuse(request, BrokerClosed(f"the pool of loop {self.key} is closing"))
            return
        drivers = set(self.idle)
        self.idle.clear()
        if not drivers:
            self._effects.resolve(request, 0)
            return
        self.check_batches.append(CheckBatch(request, set(drivers)))
        for pooled in drivers:
            self._check(pooled, hook=False, verify=True)

    def withdraw(self, request: Borrow | WaitReady, now: float) -> None:
        """A waiting caller was cancelled, or its time is up."""
        queue: Any = self.waiters if isinstance(request, Borrow) else self.ready_waiters
        try:
            queue.remove(request)
        except ValueError:
            return  # answered or skipped before this arrived
        if not request.pending():
            self._effects.forget(request)
            if isinstance(request, Borrow):
                self.cancellations += 1
            return
        ready = isinstance(request, WaitReady)
        if not ready:
            self.timeouts += 1
        error = BorrowTimeout(request.timeout, self.snapshot(now), ready=ready)
        error.__cause__ = self.last_error
        self._effects.refuse(request, error)
        context = request.context if isinstance(request, Borrow) else None
        event = "wait.timeout" if ready else "borrow.timeout"
        self._effects.emit(log.WARNING, event, timeout=request.timeout, context=context)

    def returned(self, pooled: PooledDriver, broken: bool, now: float) -> None:
        """A driver comes back: keep, check or close it; serve the next waiter."""
        if self.in_use.pop(pooled, _MISSING) is _MISSING:
            return  # closed already at a close deadline
        held = now - pooled.last_used
        self.usage_ms += held * 1000
        self.hold_histogram.observe(held)
        pooled.last_used = now
        if broken:
            self.returns_bad += 1
        reason = self._retire_reason(pooled, now)
        hook = self.config.on_return is not None
        if reason is not None:
            self._close(pooled, reason)
        elif broken or hook:
            self._check(pooled, hook=hook, verify=broken)
        else:
            self.idle.append(pooled)
        if self.waiters:
            self.dispatch(now)

    # -- what the broker asks of every pool ------------------------------------

    def resize(self, min_size: int, max_size: int, version: int, now: float) -> None:
        """New bounds: idle drivers above the maximum close now, the others on return."""
        if version <= self.sizes_version:
            return  # an older resize that arrived late
        self.sizes_version = version
        self.min_size, self.max_size = min_size, max_size
        if self.stopping is not None:
            return  # nothing grows in a closing pool
        self._effects.emit(log.INFO, "pool.resized", min_size=min_size, max_size=max_size)
        while self.idle and self.total() > max_size:
            self._close(self.idle.popleft(), "resized")
        self.dispatch(now)
        if now >= self._refill_at:
            self._refill(now)
        self._settle_ready()

    def drain(self, generation: int, now: float) -> None:
        """Replace every driver made before ``generation``: idle ones now, the others later."""
        if generation <= self.generation:
            return
        self.generation = generation
        if self.stopping is not None:
            return  # its drivers are closing anyway
        replaced = len(self.idle)
        self._effects.emit(log.INFO, "pool.drained", generation=generation, idle=replaced)
        while self.idle:
            self._close(self.idle.popleft(), "drained")
        for _ in range(replaced):
            if self.total() >= self.max_size:
                break
            self._create(None, now)
        self.dispatch(now)

    # -- job reports -----------------------------------------------------------

    def creation_ended(
        self,
        pooled: PooledDriver | None,
        error: BaseException | None,
        context: contextvars.Context | None,
        started: float,
        seconds: float,
        hook_failed: bool,
        now: float,
    ) -> None:
        """A creation job ended with a new, verified driver or with an error."""
        self.connecting.remove(started)
        if pooled is not None:
            self.created += 1
            self.connect_ms += seconds * 1000
            self._refill_backoff = 0.0
            self.last_error = None
            self.failing_since = None
            self._effects.emit(log.INFO, "driver.created", driver=pooled.id, context=context)
            self._place(pooled, now)
            return
        if error is None or isinstance(error, asyncio.CancelledError):
            return  # the loop is ending
        self.errors += 1
        if hook_failed:
            self.hook_errors += 1
        else:
            self.connect_errors += 1
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = now
        event = "driver.on_create_failed" if hook_failed else "driver.create_failed"
        self._effects.emit(log.WARNING, event, error=describe(error), context=context)
        self._fail_for_creation(error, now)
        self.dispatch(now)

    def check_ended(
        self,
        pooled: PooledDriver,
        error: BaseException | None,
        hook_error: BaseException | None,
        verified: bool,
        now: float,
    ) -> None:
        """A check job ended: the driver is fine (``error`` None) or is discarded."""
        self.checking.discard(pooled)
        if isinstance(error, asyncio.CancelledError):
            # Cut short (the loop is ending): not a failed check, but not a pass either.
            if self.check_batches:
                self._count_for_batches(pooled, True)  # it is gone all the same
            stopping = self.stopping
            self._close(pooled, stopping.reason if stopping else "health check cancelled")
            self.dispatch(now)
            return
        if hook_error is not None:
            self.hook_errors += 1
            self._effects.emit(
                log.WARNING, "driver.on_return_failed", driver=pooled.id, error=describe(hook_error)
            )
        failed = error is not None
        if self.check_batches:
            self._count_for_batches(pooled, failed)
        if not failed:
            if verified:
                pooled.last_checked = now
            self._place(pooled, now)
            return
        self.errors += 1
        self.drivers_lost += 1
        self._effects.emit(
            log.WARNING, "health_check.failed", driver=pooled.id, error=describe(error)
        )
        self._close(pooled, "failed health check", discarded=True)
        self.dispatch(now)

    def close_ended(self, pooled: PooledDriver) -> None:
        """A close job ended."""
        reason, discarded = self.closing.pop(pooled, ("unknown", False))
        self.closed += 1
        if discarded:
            self.discarded += 1
        event = "driver.discarded" if discarded else "driver.closed"
        self._effects.emit(log.INFO, event, driver=pooled.id, reason=reason)

    def is_closing(self, pooled: PooledDriver) -> bool:
        """Whether a close of ``pooled`` is under way."""
        return pooled in self.closing

    # -- the clock -------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Maintenance: idle and old drivers, the minimum size, close deadlines."""
        stopping = self.stopping
        if stopping is not None:
            self.close_abandoned()
            if now >= stopping.deadline:
                self.close_in_use("still in use at the close deadline")
            return
        config = self.config
        idle = self.idle
        while idle and self.total() > self.min_size:
            if not idle[0].is_idle_for(now, config.max_idle_time):
                break
            self._close(idle.popleft(), "max_idle_time")
        for pooled in [p for p in idle if p.has_expired(now, config.max_lifetime)]:
            idle.remove(pooled)
            self._close(pooled, "max_lifetime")
        if now >= self._refill_at:
            self._refill(now)
        self._check_reconnect(now)

    def _check_reconnect(self, now: float) -> None:
        limit = self.config.reconnect_timeout
        since = self.failing_since
        if limit is None or since is None or now - since < limit:
            return
        if len(self.idle) + len(self.in_use) >= self.min_size:
            return
        self.failing_since = now  # once per reconnect_timeout while it lasts
        stats = self.snapshot(now)
        self._effects.emit(
            log.ERROR,
            "pool.reconnect_failed",
            seconds=round(now - since, 1),
            error=stats["last_error"],
        )
        self._effects.reconnect_failed(stats)

    # -- closing ---------------------------------------------------------------

    def stop(self, reason: str, deadline: float) -> bool:
        """Stop taking borrows and close what can be closed; False if already stopping."""
        if self.stopping is not None:
            self.stopping.deadline = min(self.stopping.deadline, deadline)
            return False
        self.stopping = Stopping(reason, deadline)
        self._effects.emit(log.INFO, "actor.closing", reason=reason)
        self.fail_waiting(BrokerClosed(f"the pool of loop {self.key} is closing ({reason})"))
        while self.idle:
            self._close(self.idle.pop(), reason)
        self.close_abandoned()
        return True

    def close_abandoned(self) -> None:
        """Close drivers whose borrowing task has finished without returning them."""
        for pooled, task in list(self.in_use.items()):
            if task is not None and task.done():
                del self.in_use[pooled]
                self._close(pooled, "abandoned by its task")

    def close_in_use(self, reason: str) -> None:
        """Close every driver still in use (their late returns are ignored)."""
        for pooled in list(self.in_use):
            del self.in_use[pooled]
            self._close(pooled, reason)

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every waiting caller: borrowers, readiness waits, checks."""
        while self.waiters:
            self._effects.refuse(self.waiters.popleft(), error)
        for request in self.ready_waiters:
            self._effects.refuse(request, error)
        self.ready_waiters.clear()
        for batch in self.check_batches:
            self._effects.refuse(batch.request, error)
        self.check_batches.clear()

    # -- decisions -------------------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Hand idle drivers to waiters in order, and grow for those left."""
        waiters, idle = self.waiters, self.idle
        if not waiters:
            return
        interval = self.config.health_check_interval
        while waiters and idle:
            borrow = waiters[0]
            if not borrow.pending():  # cancelled; its Withdraw is on the way
                waiters.popleft()
                self._effects.forget(borrow)
                self.cancellations += 1
                continue
            pooled = idle.pop()
            if pooled.needs_check(now, interval):
                self._check(pooled, hook=False, verify=True)
                continue
            waiters.popleft()
            self._give(pooled, borrow, now)
        short = len(waiters) - len(self.connecting) - len(self.checking)
        while short > 0 and self.total() < self.max_size:
            # The borrower's own first query proves a driver made for it.
            self._create(waiters[len(waiters) - short].context, now, self.config.verify_on_create)
            short -= 1

    def _give(self, pooled: PooledDriver, borrow: Borrow, now: float) -> None:
        self.in_use[pooled] = borrow.task
        pooled.last_used = now
        pooled.borrows += 1
        self.borrows += 1
        waited = now - borrow.queued_at
        if waited > 0.0:
            waited_ms = waited * 1000
            self.wait_ms += waited_ms
            if waited_ms > self.wait_max_ms:
                self.wait_max_ms = waited_ms
            if waited_ms > self._window_wait_max_ms:
                self._window_wait_max_ms = waited_ms
            self.wait_histogram.observe(waited)
        else:
            self.wait_histogram.observe_zero()
        self._effects.resolve(borrow, pooled)

    def _retire_reason(self, pooled: PooledDriver, now: float) -> str | None:
        """Why a driver coming back (from a borrower or a job) must close, if it must."""
        if self.stopping is not None:
            return self.stopping.reason
        if pooled.generation < self.generation:
            return "drained"
        if self.total() >= self.max_size:  # ``pooled`` is not counted any more
            return "resized"
        if pooled.has_expired(now, self.config.max_lifetime):
            return "max_lifetime"
        limit = self.config.max_borrows
        if limit is not None and pooled.borrows >= limit:
            return "max_borrows"
        return None

    def _place(self, pooled: PooledDriver, now: float) -> None:
        """A driver that has just proved itself goes to the oldest waiter unchecked."""
        reason = self._retire_reason(pooled, now)
        if reason is not None:
            self._close(pooled, reason)
            self.dispatch(now)
            return
        borrow = self._next_waiter()
        if borrow is not None:
            self._give(pooled, borrow, now)
        else:
            self.idle.append(pooled)
        self.dispatch(now)
        self._settle_ready()

    def _next_waiter(self) -> Borrow | None:
        while self.waiters:
            borrow = self.waiters.popleft()
            if borrow.pending():
                return borrow
            self._effects.forget(borrow)
            self.cancellations += 1
        return None

    def _fail_for_creation(self, error: BaseException, now: float) -> None:
        """Who gets a creation error: the oldest waiter, or all when nothing can serve them.

        With no driver left at all (none idle, none in use), no return can
        serve the waiters: those no other running creation is for get the
        error now rather than a timeout later. Readiness waits fail at once.
        """
        borrow = self._next_waiter()
        if borrow is not None:
            self._effects.refuse(borrow, error)
            if not self.idle and not self.in_use:
                covered = len(self.connecting) + len(self.checking)
                while len(self.waiters) > covered:
                    extra = self.waiters.pop()
                    if extra.pending():
                        self._effects.refuse(extra, error)
                    else:
                        self._effects.forget(extra)
                        self.cancellations += 1
        else:
            self._refill_backoff = min(max(_BACKOFF_FIRST, self._refill_backoff * 2), _BACKOFF_MAX)
            self._refill_at = now + self._refill_backoff
        for request in self.ready_waiters:
            self._effects.refuse(request, error)
        self.ready_waiters.clear()

    def _refill(self, now: float) -> None:
        while self.total() < self.min_size:
            self._create(None, now)

    def _settle_ready(self) -> None:
        if self.ready_waiters and self.is_ready():
            for request in self.ready_waiters:
                self._effects.resolve(request, None)
            self.ready_waiters.clear()

    def _count_for_batches(self, pooled: PooledDriver, failed: bool) -> None:
        for batch in list(self.check_batches):
            if pooled not in batch.remaining:
                continue
            batch.remaining.discard(pooled)
            if failed:
                batch.discarded += 1
            if not batch.remaining:
                self.check_batches.remove(batch)
                self._effects.resolve(batch.request, batch.discarded)

    def _create(self, context: contextvars.Context | None, now: float, verify: bool = True) -> None:
        self.connecting.append(now)
        self._effects.start_create(context, self.generation, now, verify)

    def _check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        self.checking.add(pooled)
        self._effects.start_check(pooled, hook, verify)

    def _close(self, pooled: PooledDriver, reason: str, discarded: bool = False) -> None:
        self.closing[pooled] = (reason, discarded)
        self._effects.start_close(pooled)

    # -- reading ---------------------------------------------------------------

    def total(self) -> int:
        """Drivers that count against the maximum: idle, in use, being created or checked."""
        return len(self.idle) + len(self.in_use) + len(self.connecting) + len(self.checking)

    def is_ready(self) -> bool:
        """Whether the pool holds ``min_size`` verified drivers (idle or in use)."""
        return len(self.idle) + len(self.in_use) >= self.min_size

    def is_empty(self) -> bool:
        """Nothing left to close or wait for."""
        return self.total() == 0 and not self.closing

    def snapshot(self, now: float) -> dict[str, Any]:
        """The pool's state, and its counters since it started.

        Other threads read it too (stats of a parked or busy loop): each
        figure is read once and the read never fails, though figures read
        that way may come from slightly different moments.
        """
        if self.stopped:
            state = "stopped"
        elif self.stopping is not None:
            state = "closing"
        else:
            state = "open"
        oldest = min(self.connecting, default=None)
        waiting = len(self.waiters)
        stats: dict[str, Any] = {
            "loop": self.key,
            "thread": self.thread_name,
            "state": state,
            "available": len(self.idle),
            "in_use": len(self.in_use),
            "creating": len(self.connecting),
            "checking": len(self.checking),
            "closing": len(self.closing),
            "total": self.total(),
            "waiting": waiting,
            "requests_waiting": waiting,
            "ready": len(self.idle) + len(self.in_use),
            "max_size": self.max_size,
            "min_size": self.min_size,
            "max_waiting": self.config.max_waiting,
            "generation": self.generation,
            "target": self.target,
            "connecting_ms": 0 if oldest is None else round((now - oldest) * 1000),
            "last_error": describe(self.last_error) if self.last_error is not None else None,
        }
        for name in COUNTERS:
            stats[name] = _shown(getattr(self, name))
        stats["wait_max_ms"] = _shown(self.wait_max_ms)
        return stats

    def pop_stats(self, now: float) -> dict[str, Any]:
        """:meth:`snapshot` with the counters since the previous call, which resets them.

        Only this view is reset: :meth:`snapshot`, the totals and the
        histograms keep growing (a Prometheus counter never goes back).
        """
        stats = self.peek_stats(now)
        self._popped = {name: getattr(self, name) for name in COUNTERS}
        self._window_wait_max_ms = 0.0
        return stats

    def peek_stats(self, now: float) -> dict[str, Any]:
        """What :meth:`pop_stats` would return, without resetting anything."""
        stats = self.snapshot(now)
        popped = self._popped
        for name in COUNTERS:
            stats[name] = _shown(getattr(self, name) - popped[name])
        stats["wait_max_ms"] = _shown(self._window_wait_max_ms)
        return stats

    def log_fields(self) -> dict[str, Any]:
        """The loop key, thread name and pool counters every event carries."""
        return {
            "loop": self.key,
            "thread": self.thread_name,
            "available": len(self.idle),
            "in_use": len(self.in_use),
            "creating": len(self.connecting),
            "waiting": len(self.waiters),
            "total": self.total(),
        }


def describe(error: BaseException | None) -> str:
    """An error as ``Type: message`` for logs and reports, with its root cause.

    The driver often wraps the real reason (a refused certificate, a reset
    socket) in a general one such as "Unable to retrieve routing information".
    """
    if error is None:
        return "none"
    shown = _one_line(error)
    root, seen = error, {id(error)}
    while True:
        inner = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    if root is not error and str(root) not in str(error):
        shown += f" (caused by {_one_line(root)})"
    return shown


def _one_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _shown(value: float) -> int:
    """A counter as reported: durations (ms) rounded to whole milliseconds."""
    return round(value)
