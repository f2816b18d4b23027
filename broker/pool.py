"""One event loop's pool: what it holds, and every decision about it.

Plain code, with no event loop and no I/O, so each decision can be read and
tested on its own. The actor (:mod:`broker.actor`) tells the pool what
happened (a borrow, a return, the report of a job, the clock) and the pool
decides who is served next, what is created, checked or closed, and keeps
the counters. It has the actor carry out each decision through
:class:`Effects`: start a job, answer a caller, log an event.

What the pool decides, in one place each:

- who is served next: :meth:`Pool.dispatch` (first come, first served, see
  :class:`~broker.queues.Waiters`; idle drivers go out most recently used
  first, see :class:`~broker.queues.IdleDrivers`, and those due for a check
  are verified first);
- backpressure: :meth:`Pool.borrow` refuses a borrow that would queue beyond
  ``max_waiting``;
- what grows: :meth:`Pool.dispatch` (for waiters), :meth:`Pool.tick` and
  :meth:`Pool.wait_ready` (up to the minimum), never beyond ``max_size``;
- what closes: :meth:`Pool._retire_reason` for every driver that comes back
  from a borrower or a job (closing, drained, over the bound after a resize,
  too old, handed out ``max_borrows`` times), :meth:`Pool.tick` for idle ones;
- resize bounds and drain generations: :meth:`Pool.resize`, :meth:`Pool.drain`;
- the counters (:class:`~broker.stats.Counters`) and timing histograms.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broker import log
from broker.errors import BorrowTimeout, BrokerClosed, TooManyWaiters, describe
from broker.messages import Borrow, Checked, CheckNow, Created, WaitReady
from broker.pool_state import CheckBatch, PoolState, Stopping
from broker.pooled import PooledDriver

__all__ = ["Pool"]

_MISSING: Any = object()


class Pool(PoolState):
    """Every decision about one loop's pool (its state is :class:`PoolState`).

    Every method takes the time (``time.monotonic()``) from its caller, so
    tests drive the clock.
    """

    # -- callers -------------------------------------------------------------

    def borrow(self, borrow: Borrow, now: float) -> None:
        """A borrower asks for a driver: serve it now, queue it (and grow), or refuse it."""
        if self.stopping is not None:
            self._effects.refuse(borrow, self._closing_error())
            return
        waiters = self.waiters
        limit = self.config.max_waiting
        # Waiters and idle drivers never coexist (dispatch pairs them off), so
        # a full queue means nothing could serve this borrower now either.
        if limit and len(waiters) >= limit and waiters.pending() >= limit:
            self._reject(borrow, waiters.pending(), limit)
            return
        borrow.queued_at = now
        idle = self.idle
        # Nobody ahead and a driver idle: what dispatch() would do, directly.
        # (A driver closed while idle is found by tick() and dispatch().)
        if (
            not waiters
            and idle
            and not borrow.waiter.done()
            and not idle[-1].needs_check(now, self.config.health_check_interval)
        ):
            self._give(idle.take(), borrow, now)
            return
        waiters.append(borrow)
        self.dispatch(now)
        if borrow.pending():
            self.counters.requests_queued += 1

    def _reject(self, borrow: Borrow, waiting: int, limit: int) -> None:
        self.counters.rejected += 1
        self._effects.refuse(
            borrow,
            TooManyWaiters(
                f"{waiting} borrowers already wait for a driver of loop {self.key} "
                f"(max_waiting={limit})"
            ),
        )
        self._effects.emit(log.INFO, "borrow.rejected", max_waiting=limit)

    def wait_ready(self, request: WaitReady, now: float) -> None:
        """Answer once the pool holds ``min_size`` verified drivers; start them now."""
        if self.stopping is not None:
            self._effects.refuse(request, self._closing_error())
            return
        if self.is_ready():
            self._effects.resolve(request, None)
            return
        self.ready_waiters.append(request)
        self._refill(now)

    def check_all(self, request: CheckNow, now: float) -> None:
        """Verify every idle driver now; answer with how many were discarded."""
        if self.stopping is not None:
            self._effects.refuse(request, self._closing_error())
            return
        drivers = set(self.idle.take_all())
        if not drivers:
            self._effects.resolve(request, 0)
            return
        self.check_batches.append(CheckBatch(request, set(drivers)))
        for pooled in drivers:
            self._check(pooled, hook=False, verify=True)

    def withdraw(self, request: Borrow | WaitReady, now: float) -> None:
        """A waiting caller was cancelled, or its time is up."""
        if isinstance(request, Borrow):
            if not self.waiters.discard(request):
                return  # answered or skipped before this arrived
        elif request in self.ready_waiters:
            self.ready_waiters.remove(request)
        else:
            return
        if not request.pending():
            self._effects.forget(request)
            if isinstance(request, Borrow):
                self.counters.cancellations += 1
            return
        ready = isinstance(request, WaitReady)
        if not ready:
            self.counters.timeouts += 1
        error = BorrowTimeout(request.timeout, self.snapshot(now), ready=ready)
        error.__cause__ = self.creations.last_error
        self._effects.refuse(request, error)
        context = request.context if isinstance(request, Borrow) else None
        event = "wait.timeout" if ready else "borrow.timeout"
        self._effects.emit(log.WARNING, event, timeout=request.timeout, context=context)

    def returned(self, pooled: PooledDriver, broken: bool, now: float) -> None:
        """A driver comes back: keep, check or close it; serve the next waiter."""
        if self.in_use.pop(pooled, _MISSING) is _MISSING:
            return  # closed already at a close deadline
        held = now - pooled.last_used
        self.counters.usage_ms += held * 1000
        self.hold_histogram.observe(held)
        pooled.last_used = now
        if broken:
            self.counters.returns_bad += 1
        if pooled.is_closed():
            self._discard_closed(pooled, "returned")
            self.dispatch(now)
            return
        reason = self._retire_reason(pooled, now)
        hook = self.config.on_return is not None
        if reason is not None:
            self._close(pooled, reason)
        elif broken or hook:
            self._check(pooled, hook=hook, verify=broken)
        else:
            self.idle.put(pooled)
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
            self._close(self.idle.take_least_recent(), "resized")
        self.dispatch(now)
        if self.creations.may_refill(now):
            self._refill(now)
        self._settle_ready()

    def drain(self, generation: int, now: float) -> None:
        """Replace every driver made before ``generation``: idle ones now, the others later."""
        if generation <= self.generation:
            return
        self.generation = generation
        if self.stopping is not None:
            return  # its drivers are closing anyway
        replaced = self.idle.take_all()
        self._effects.emit(log.INFO, "pool.drained", generation=generation, idle=len(replaced))
        for pooled in replaced:
            self._close(pooled, "drained")
        for _ in replaced:
            if self.total() >= self.max_size:
                break
            self._create(None, now)
        self.dispatch(now)

    # -- job reports -----------------------------------------------------------

    def creation_ended(self, report: Created, now: float) -> None:
        """A creation job ended with a new, verified driver or with an error."""
        self.creations.end(report.started)
        pooled, error = report.driver, report.error
        if pooled is not None:
            self.counters.created += 1
            self.counters.connect_ms += report.seconds * 1000
            self.creations.succeeded()
            self._place(pooled, now)  # first, so that the event counts it where it went
            self._effects.emit(log.INFO, "driver.created", driver=pooled.id, context=report.context)
            return
        if error is None or isinstance(error, asyncio.CancelledError):
            return  # the loop is ending
        self.counters.errors += 1
        if report.hook_failed:
            self.counters.hook_errors += 1
        else:
            self.counters.connect_errors += 1
        self.creations.failed(error, now)
        event = "driver.on_create_failed" if report.hook_failed else "driver.create_failed"
        self._effects.emit(
            log.WARNING,
            event,
            error=describe(error),
            phase=report.phase,
            target=self.target,
            user=self.config.username,
            context=report.context,
        )
        self._fail_for_creation(error, report.started, now)
        self.dispatch(now)

    def check_ended(self, report: Checked, now: float) -> None:
        """A check job ended: the driver is fine (``error`` None) or is discarded."""
        pooled, error = report.driver, report.error
        self.checking.discard(pooled)
        if isinstance(error, asyncio.CancelledError):
            # Cut short (the loop is ending): not a failed check, but not a pass either.
            if self.check_batches:
                self._count_for_batches(pooled, True)  # it is gone all the same
            stopping = self.stopping
            self._close(pooled, stopping.reason if stopping else "health check cancelled")
            self.dispatch(now)
            return
        if report.hook_error is not None:
            self.counters.hook_errors += 1
            self._effects.emit(
                log.WARNING,
                "driver.on_return_failed",
                driver=pooled.id,
                error=describe(report.hook_error),
            )
        if self.check_batches:
            self._count_for_batches(pooled, error is not None)
        if error is None:
            if report.verified:
                pooled.last_checked = now
            self._place(pooled, now)
            return
        self.counters.errors += 1
        self.counters.drivers_lost += 1
        self.creations.last_error = error
        self._effects.emit(
            log.WARNING, "health_check.failed", driver=pooled.id, error=describe(error)
        )
        self._close(pooled, "failed health check", discarded=True)
        self.dispatch(now)

    def close_ended(self, pooled: PooledDriver) -> None:
        """A close job ended."""
        reason, discarded = self.closing.pop(pooled, ("unknown", False))
        self.counters.closed += 1
        if discarded:
            self.counters.discarded += 1
        event = "driver.discarded" if discarded else "driver.closed"
        self._effects.emit(log.INFO, event, driver=pooled.id, reason=reason)

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
        for pooled in [p for p in idle if p.is_closed()]:
            idle.remove(pooled)
            self._discard_closed(pooled, "idle")
        while idle and self.total() > self.min_size:
            if not idle.least_recent().is_idle_for(now, config.max_idle_time):
                break
            self._close(idle.take_least_recent(), "max_idle_time")
        for pooled in [p for p in idle if p.has_expired(now, config.max_lifetime)]:
            idle.remove(pooled)
            self._close(pooled, "max_lifetime")
        if self.creations.may_refill(now):
            self._refill(now)
        self._check_reconnect(now)

    def _check_reconnect(self, now: float) -> None:
        if self.is_ready() or self.creations.failing_since is None:
            return
        seconds = self.creations.overdue(now, self.config.reconnect_timeout)
        if seconds is None:
            return
        stats = self.snapshot(now)
        self._effects.emit(
            log.ERROR, "pool.reconnect_failed", seconds=round(seconds, 1), error=stats["last_error"]
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
        self.fail_waiting(self._closing_error())
        for pooled in self.idle.take_all():
            self._close(pooled, reason)
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
        for borrow in self.waiters.take_all():
            self._effects.refuse(borrow, error)
        for request in self.ready_waiters:
            self._effects.refuse(request, error)
        self.ready_waiters.clear()
        for batch in self.check_batches:
            self._effects.refuse(batch.request, error)
        self.check_batches.clear()

    def _closing_error(self) -> BrokerClosed:
        reason = f" ({self.stopping.reason})" if self.stopping is not None else ""
        return BrokerClosed(f"the pool of loop {self.key} is closing{reason}")

    # -- decisions -------------------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Hand idle drivers to waiters in order, and grow for those left."""
        waiters, idle = self.waiters, self.idle
        if not waiters:
            return
        interval = self.config.health_check_interval
        while idle:
            borrow = waiters.first()
            if borrow is None:
                break
            pooled = idle.take()
            if pooled.is_closed():
                self._discard_closed(pooled, "idle")
                continue
            if pooled.needs_check(now, interval):
                self._check(pooled, hook=False, verify=True)
                continue
            waiters.popleft()  # ``borrow``, just found by first()
            self._give(pooled, borrow, now)
        short = len(waiters) - len(self.creations.started) - len(self.checking)
        while short > 0 and self.total() < self.max_size:
            # The borrower's own first query proves a driver made for it.
            borrow = waiters.nth(len(waiters) - short)
            self._create(borrow.context, now, self.config.verify_on_create)
            short -= 1

    def _give(self, pooled: PooledDriver, borrow: Borrow, now: float) -> None:
        self.in_use[pooled] = borrow.task
        pooled.last_used = now
        pooled.borrows += 1
        counters = self.counters
        counters.borrows += 1
        waited = now - borrow.queued_at
        if waited > 0.0:
            waited_ms = waited * 1000
            counters.wait_ms += waited_ms
            if waited_ms > self.wait_max_ms:
                self.wait_max_ms = waited_ms
            window = self.window
            if waited_ms > window.wait_max_ms:
                window.wait_max_ms = waited_ms
            self.wait_histogram.observe(waited)
        else:
            self.wait_histogram.observe_zero()
        self._effects.resolve(borrow, pooled)

    def _discard_closed(self, pooled: PooledDriver, found: str) -> None:
        """A driver someone closed (its borrower, a library's ``finalize()``) leaves for good."""
        self._effects.emit(
            log.WARNING,
            "driver.closed_by_borrower",
            driver=pooled.id,
            found=found,
            hint="a borrowed driver belongs to the pool: release it, never close it",
        )
        self._close(pooled, "closed by its borrower", discarded=True)

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
        borrow = self.waiters.next()
        if borrow is not None:
            self._give(pooled, borrow, now)
        else:
            self.idle.put(pooled)
        self.dispatch(now)
        self._settle_ready()

    def _fail_for_creation(self, error: BaseException, started: float, now: float) -> None:
        """Who gets a creation error: waiters the attempt could have served, never later ones.

        The oldest waiter gets it if it was there when the attempt began.
        With no driver left at all (none idle, none in use), no return can
        serve the waiters: those that were there too, and that no other
        running creation is for, get the error now rather than a timeout
        later. Waiters that came after the attempt began get a new attempt
        (``dispatch``). Readiness waits fail at once.
        """
        borrow = self.waiters.first()
        if borrow is not None and borrow.queued_at <= started:
            self._effects.refuse(self.waiters.next(), error)  # type: ignore[arg-type]
            if not self.idle and not self.in_use:
                covered = len(self.creations.started) + len(self.checking)
                for extra in self.waiters.arrived_by(started)[covered:]:
                    self.waiters.discard(extra)
                    self._effects.refuse(extra, error)
        elif borrow is None:
            self.creations.back_off(now)
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
