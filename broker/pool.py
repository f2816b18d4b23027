"""One event loop's pool: what it holds, and every decision about it.

Plain code, with no event loop and no I/O, so each decision can be read and
tested on its own. The actor (:mod:`broker.actor`) tells the pool what
happened (a borrow, a return, the report of a job, the clock) and the pool
decides who is served next, what is created, checked or closed, and keeps
the counters. It has the actor carry out each decision through
:class:`Effects`: start a job, answer a caller, log an event.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from typing import Any, Final, Protocol

from broker import log
from broker.config import Neo4jConnectionConfig
from broker.connection import PooledDriver
from broker.errors import BorrowTimeout, BrokerClosed
from broker.messages import Borrow

__all__ = ["COUNTERS", "Effects", "Pool", "Stopping"]

#: Counters that only grow while a pool lives (summed over loops by ``Broker.totals``).
COUNTERS: Final = (
    "borrows",
    "timeouts",
    "cancellations",
    "created",
    "closed",
    "discarded",
    "errors",
)

_MISSING: Any = object()


class Effects(Protocol):
    """What the pool has its actor do (jobs report back with a message)."""

    def start_create(self, context: contextvars.Context | None) -> None:
        """Start a job that makes and verifies a new driver."""

    def start_check(self, pooled: PooledDriver) -> None:
        """Start a job that verifies ``pooled``."""

    def start_close(self, pooled: PooledDriver) -> None:
        """Start a job that closes ``pooled``."""

    def resolve(self, borrow: Borrow, pooled: PooledDriver) -> None:
        """Hand ``pooled`` to a waiting borrower."""

    def refuse(self, borrow: Borrow, error: BaseException) -> None:
        """Fail a waiting borrower with ``error``."""

    def forget(self, borrow: Borrow) -> None:
        """A cancelled borrower left the queue: drop what the actor kept for it."""

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


class Pool:
    """The drivers of one loop, its waiting borrowers, and its counters.

    Every method takes the time (``time.monotonic()``) from its caller, so
    tests can drive the clock.
    """

    def __init__(
        self, config: Neo4jConnectionConfig, effects: Effects, key: str, thread_name: str
    ) -> None:
        self.config = config
        self.key = key
        self.thread_name = thread_name
        self._effects = effects
        self.idle: deque[PooledDriver] = deque()  # least recently used on the left
        #: Drivers handed out, with the borrowing task (to notice abandoned ones).
        self.in_use: dict[PooledDriver, Any] = {}
        self.creating = 0
        self.checking: set[PooledDriver] = set()
        #: Drivers being closed, with the reason and whether it counts as a discard.
        self.closing: dict[PooledDriver, tuple[str, bool]] = {}
        self.waiters: deque[Borrow] = deque()
        self.stopping: Stopping | None = None
        #: Set by the actor once it has stopped for good.
        self.stopped = False
        self._refill_at = 0.0
        self._refill_backoff = 0.0
        # Counters since the pool started.
        self.borrows = 0
        self.timeouts = 0
        self.cancellations = 0
        self.created = 0
        self.closed = 0
        self.discarded = 0
        self.errors = 0

    # -- borrowers -----------------------------------------------------------

    def borrow(self, borrow: Borrow, now: float) -> None:
        """A borrower asks for a driver: serve it now, or queue it (and grow)."""
        if self.stopping is not None:
            self._effects.refuse(borrow, BrokerClosed(f"the pool of loop {self.key} is closing"))
            return
        self.waiters.append(borrow)
        self.dispatch(now)

    def withdraw(self, borrow: Borrow) -> None:
        """A waiting borrower was cancelled, or its time is up."""
        try:
            self.waiters.remove(borrow)
        except ValueError:
            return  # served, failed or skipped before this arrived
        if not borrow.pending():
            self._effects.forget(borrow)
            self.cancellations += 1
            return
        self.timeouts += 1
        self._effects.refuse(borrow, BorrowTimeout(borrow.timeout, self.snapshot()))
        self._effects.emit(
            log.WARNING, "borrow.timeout", timeout=borrow.timeout, context=borrow.context
        )

    def returned(self, pooled: PooledDriver, broken: bool, now: float) -> None:
        """A driver comes back: keep it, check it or close it; serve the next waiter."""
        if self.in_use.pop(pooled, _MISSING) is _MISSING:
            return  # closed already at a close deadline
        pooled.last_used = now
        if self.stopping is not None:
            self._close(pooled, self.stopping.reason)
        elif pooled.has_expired(now, self.config.max_lifetime):
            self._close(pooled, "max_lifetime")
        elif broken:
            self._check(pooled)
        else:
            self.idle.append(pooled)
        self.dispatch(now)

    # -- job reports -----------------------------------------------------------

    def creation_ended(
        self,
        pooled: PooledDriver | None,
        error: BaseException | None,
        context: contextvars.Context | None,
        now: float,
    ) -> None:
        """A creation job ended with a new, verified driver or with an error."""
        self.creating -= 1
        if pooled is not None:
            self.created += 1
            self._refill_backoff = 0.0
            self._effects.emit(log.INFO, "driver.created", driver=pooled.id, context=context)
            if self.stopping is not None:
                self._close(pooled, self.stopping.reason)
            else:
                self._hand_over_verified(pooled, now)
            return
        if error is None or isinstance(error, asyncio.CancelledError):
            return  # the loop is ending
        self.errors += 1
        self._effects.emit(
            log.WARNING, "driver.create_failed", error=describe(error), context=context
        )
        borrow = self._next_waiter()
        if borrow is not None:
            self._effects.refuse(borrow, error)
        else:
            self._refill_backoff = min(max(1.0, self._refill_backoff * 2), 30.0)
            self._refill_at = now + self._refill_backoff
        self.dispatch(now)

    def check_ended(self, pooled: PooledDriver, error: BaseException | None, now: float) -> None:
        """A check job ended: the driver is fine (``error`` None) or is discarded."""
        self.checking.discard(pooled)
        if isinstance(error, asyncio.CancelledError):
            # Cut short (the loop is ending): not a failed check, but not a pass either.
            stopping = self.stopping
            self._close(pooled, stopping.reason if stopping else "health check cancelled")
            self.dispatch(now)
            return
        if error is None:
            pooled.last_checked = now
            if self.stopping is not None:
                self._close(pooled, self.stopping.reason)
            else:
                self._hand_over_verified(pooled, now)
            return
        self.errors += 1
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
        while idle and self.total() > config.pool_min_size:
            if not idle[0].is_idle_for(now, config.max_idle_time):
                break
            self._close(idle.popleft(), "max_idle_time")
        for pooled in [p for p in idle if p.has_expired(now, config.max_lifetime)]:
            idle.remove(pooled)
            self._close(pooled, "max_lifetime")
        if now >= self._refill_at:
            while self.total() < config.pool_min_size:
                self._create(None)

    # -- closing ---------------------------------------------------------------

    def stop(self, reason: str, deadline: float) -> bool:
        """Stop taking borrows and close what can be closed; False if already stopping."""
        if self.stopping is not None:
            self.stopping.deadline = min(self.stopping.deadline, deadline)
            return False
        self.stopping = Stopping(reason, deadline)
        self._effects.emit(log.INFO, "actor.closing", reason=reason)
        closed = BrokerClosed(f"the pool of loop {self.key} is closing ({reason})")
        while self.waiters:
            self._effects.refuse(self.waiters.popleft(), closed)
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

    def fail_waiters(self, error: BaseException) -> None:
        """Fail every waiting borrower (the actor is stopping for good)."""
        while self.waiters:
            self._effects.refuse(self.waiters.popleft(), error)

    # -- decisions -------------------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Hand idle drivers to waiters in order, and grow for those left."""
        waiters, idle = self.waiters, self.idle
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
                self._check(pooled)
                continue
            waiters.popleft()
            self._give(pooled, borrow, now)
        short = len(waiters) - self.creating - len(self.checking)
        while short > 0 and self.total() < self.config.pool_max_size:
            self._create(waiters[len(waiters) - short].context)
            short -= 1

    def _give(self, pooled: PooledDriver, borrow: Borrow, now: float) -> None:
        self.in_use[pooled] = borrow.task
        pooled.last_used = now
        self.borrows += 1
        self._effects.resolve(borrow, pooled)

    def _hand_over_verified(self, pooled: PooledDriver, now: float) -> None:
        """A driver that has just proved itself goes to the oldest waiter unchecked."""
        borrow = self._next_waiter()
        if borrow is not None:
            self._give(pooled, borrow, now)
        else:
            self.idle.append(pooled)
        self.dispatch(now)

    def _next_waiter(self) -> Borrow | None:
        while self.waiters:
            borrow = self.waiters.popleft()
            if borrow.pending():
                return borrow
            self._effects.forget(borrow)
            self.cancellations += 1
        return None

    def _create(self, context: contextvars.Context | None) -> None:
        self.creating += 1
        self._effects.start_create(context)

    def _check(self, pooled: PooledDriver) -> None:
        self.checking.add(pooled)
        self._effects.start_check(pooled)

    def _close(self, pooled: PooledDriver, reason: str, discarded: bool = False) -> None:
        self.closing[pooled] = (reason, discarded)
        self._effects.start_close(pooled)

    # -- reading ---------------------------------------------------------------

    def total(self) -> int:
        """Drivers that count against the maximum: idle, in use, being created or checked."""
        return len(self.idle) + len(self.in_use) + self.creating + len(self.checking)

    def is_empty(self) -> bool:
        """Nothing left to close or wait for."""
        return self.total() == 0 and not self.closing

    def snapshot(self) -> dict[str, Any]:
        """The pool's state and counters."""
        if self.stopped:
            state = "stopped"
        elif self.stopping is not None:
            state = "closing"
        else:
            state = "open"
        return {
            "loop": self.key,
            "thread": self.thread_name,
            "state": state,
            "available": len(self.idle),
            "in_use": len(self.in_use),
            "creating": self.creating,
            "checking": len(self.checking),
            "closing": len(self.closing),
            "total": self.total(),
            "waiting": len(self.waiters),
            "max_size": self.config.pool_max_size,
            "min_size": self.config.pool_min_size,
            "borrows": self.borrows,
            "timeouts": self.timeouts,
            "cancellations": self.cancellations,
            "created": self.created,
            "closed": self.closed,
            "discarded": self.discarded,
            "errors": self.errors,
        }

    def log_fields(self) -> dict[str, Any]:
        """The loop key, thread name and pool counters every event carries."""
        return {
            "loop": self.key,
            "thread": self.thread_name,
            "available": len(self.idle),
            "in_use": len(self.in_use),
            "creating": self.creating,
            "waiting": len(self.waiters),
            "total": self.total(),
        }


def describe(error: BaseException | None) -> str:
    """An error as ``Type: message`` for logs and reports."""
    if error is None:
        return "none"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
