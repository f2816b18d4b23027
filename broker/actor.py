"""One event loop's pool of drivers, owned and served by one actor.

The actor is a task in its loop. Everything that changes the pool happens
while it handles a message from its janus mailbox: borrowers post from the
loop's own thread through the async side, other threads through the sync
side. The actor never waits on I/O itself: creating, checking and closing a
driver are jobs (tasks of their own) that report back with a message.

The actor drains its mailbox in batches and, when it is empty, parks on a
future of its own loop. Senders in the loop wake it by setting that future;
senders in other threads schedule the same wake-up with
``call_soon_threadsafe``. So the common borrow and return never pay for
janus's cross-thread notifier task.

The actor's maintenance timer is scheduled on its loop, so the loop holds
the actor (and the actor its loop) and nothing else needs to: the process
registry keeps only weak references. When the loop is closed or dropped, the
actor goes with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import janus
from neo4j import AsyncDriver
from neo4j.exceptions import ServiceUnavailable

from broker import log
from broker.config import Neo4jConnectionConfig
from broker.connection import PooledDriver
from broker.errors import BorrowTimeout, BrokerClosed
from broker.loop_end import end_with_loop
from broker.messages import (
    Borrow,
    Checked,
    Closed,
    Created,
    Message,
    Return,
    Shutdown,
    StatsRequest,
    Tick,
    Withdraw,
)

__all__ = ["Actor", "DriverFactory"]

#: Makes one (not yet connected) driver from a config.
DriverFactory = Callable[[Neo4jConnectionConfig], AsyncDriver]

_MISSING: Any = object()
_STOPPING_TICK = 0.05


class _Stopping:
    __slots__ = ("deadline", "reason")

    def __init__(self, reason: str, deadline: float) -> None:
        self.reason = reason
        self.deadline = deadline


class Actor:
    """Serves one event loop's pool. Create it in that loop, then :meth:`start` it."""

    def __init__(
        self,
        config: Neo4jConnectionConfig,
        loop: asyncio.AbstractEventLoop,
        key: str,
        driver_factory: DriverFactory,
        on_stopped: Callable[[Actor, bool], None],
    ) -> None:
        self.config = config
        self.loop = loop
        self.key = key
        self.thread_name = threading.current_thread().name
        self._factory = driver_factory
        self._on_stopped = on_stopped
        self._mailbox: janus.Queue[Message] = janus.Queue()
        self._inbox = self._mailbox.async_q
        self._outside_inbox = self._mailbox.sync_q
        self._bell: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Each job task with the report to send if it is cancelled before reporting.
        self._jobs: dict[asyncio.Task[Message], Message] = {}
        # The pool.
        self._idle: deque[PooledDriver] = deque()  # least recently used on the left
        self._in_use: dict[PooledDriver, asyncio.Task[Any] | None] = {}
        self._creating = 0
        self._checking: set[PooledDriver] = set()
        self._closing: dict[PooledDriver, tuple[str, bool]] = {}
        self._waiters: deque[Borrow] = deque()
        self._stopping: _Stopping | None = None
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._finished = False
        self._refill_at = 0.0
        self._refill_backoff = 0.0
        # Counters since the actor started.
        self.borrows = 0
        self.timeouts = 0
        self.cancellations = 0
        self.created = 0
        self.closed = 0
        self.discarded = 0
        self.errors = 0
        #: Workspace preparations running in this loop (shared by concurrent callers).
        self.preparing: dict[str, asyncio.Future[str]] = {}

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Start serving; call from the loop's thread."""
        # A context of its own: the borrower that happened to start the actor
        # must not lend its context variables (a task id) to every later log line.
        self._task = self.loop.create_task(
            self._run(), name=f"broker-actor {self.key}", context=contextvars.Context()
        )
        end_with_loop(self._task)  # even if the loop is already ending (asyncio.run's teardown)
        self._arm_timer()

    @property
    def finished(self) -> bool:
        """True once the actor has stopped and closed its mailbox."""
        return self._finished

    async def _run(self) -> None:
        self._emit(log.INFO, "actor.started")
        loop_ending = destroyed = False
        try:
            try:
                await self._serve()
            except asyncio.CancelledError:
                # asyncio.run() is ending the loop: close every driver here, now.
                loop_ending = True
                self._begin_stop("event loop ending", self.config.close_timeout)
                while True:
                    try:
                        await self._serve()
                        break
                    except asyncio.CancelledError:
                        self._close_in_use("cancelled again while closing")
        except GeneratorExit:
            # Garbage-collected with a loop that was dropped while we were
            # pending: there is no loop left to close anything on.
            destroyed = True
            self._finished = True
            raise
        finally:
            if not destroyed:
                self._finish(loop_ending)
        if loop_ending:
            raise asyncio.CancelledError

    async def _serve(self) -> None:
        while True:
            self._drain()
            if self._stopping is not None and self._is_empty():
                return
            bell = self.loop.create_future()
            self._bell = bell
            try:
                await bell
            finally:
                self._bell = None

    def _drain(self) -> None:
        get = self._inbox.get_nowait
        while True:
            try:
                message = get()
            except asyncio.QueueEmpty:
                return
            try:
                self._handle(message)
            except Exception as exc:  # a bug must not take the whole loop's pool down
                name = type(message).__name__
                self._emit(log.ERROR, "actor.error", error=repr(exc), message=name)

    # -- messages --------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        match message:
            case Borrow():
                self._on_borrow(message)
            case Return():
                self._on_return(message)
            case Withdraw():
                self._on_withdraw(message)
            case Created():
                self._on_created(message)
            case Checked():
                self._on_checked(message)
            case Closed():
                self._on_closed(message)
            case Tick():
                self._on_tick()
            case StatsRequest():
                message.reply(self.snapshot())
            case Shutdown():
                self._on_shutdown(message)

    def _on_borrow(self, borrow: Borrow) -> None:
        if self._stopping is not None:
            _fail(borrow.waiter, BrokerClosed(f"the pool of loop {self.key} is closing"))
            return
        self._waiters.append(borrow)
        self._dispatch()
        if not borrow.waiter.done() and borrow.timeout != float("inf"):
            borrow.expiry = self.loop.call_later(borrow.timeout, self._expire, borrow)

    def _on_return(self, message: Return) -> None:
        pooled = message.driver
        if self._in_use.pop(pooled, _MISSING) is _MISSING:
            return  # closed already at a close deadline
        now = time.monotonic()
        pooled.last_used = now
        if self._stopping is not None:
            self._start_close(pooled, self._stopping.reason)
        elif pooled.has_expired(now, self.config.max_lifetime):
            self._start_close(pooled, "max_lifetime")
        elif message.broken:
            self._start_check(pooled)
        else:
            self._idle.append(pooled)
        self._dispatch()

    def _on_withdraw(self, message: Withdraw) -> None:
        borrow = message.borrow
        _disarm(borrow)
        try:
            self._waiters.remove(borrow)
        except ValueError:
            return  # served, failed or skipped before this arrived
        if borrow.waiter.cancelled():
            self.cancellations += 1
            return
        self.timeouts += 1
        _fail(borrow.waiter, BorrowTimeout(borrow.timeout, self.snapshot()))
        self._emit(log.WARNING, "borrow.timeout", timeout=borrow.timeout, context=borrow.context)

    def _on_created(self, message: Created) -> None:
        self._creating -= 1
        pooled = message.driver
        if pooled is not None:
            self.created += 1
            self._refill_backoff = 0.0
            self._emit(log.INFO, "driver.created", driver=pooled.id, context=message.context)
            if self._stopping is not None:
                self._start_close(pooled, self._stopping.reason)
            else:
                self._hand_over_verified(pooled)
            return
        error = message.error
        if isinstance(error, asyncio.CancelledError):
            return  # the loop is ending
        self.errors += 1
        self._emit(
            log.WARNING, "driver.create_failed", error=_describe(error), context=message.context
        )
        waiter = self._next_waiter()
        if waiter is not None:
            assert error is not None
            _disarm(waiter)
            _fail(waiter.waiter, error)
        else:
            self._refill_backoff = min(max(1.0, self._refill_backoff * 2), 30.0)
            self._refill_at = time.monotonic() + self._refill_backoff
        self._dispatch()

    def _on_checked(self, message: Checked) -> None:
        pooled = message.driver
        self._checking.discard(pooled)
        if isinstance(message.error, asyncio.CancelledError):
            # Cut short (the loop is ending): not a failed check, but not a pass either.
            stopping = self._stopping
            self._start_close(pooled, stopping.reason if stopping else "health check cancelled")
            self._dispatch()
            return
        if message.error is None:
            pooled.last_checked = time.monotonic()
            if self._stopping is not None:
                self._start_close(pooled, self._stopping.reason)
            else:
                self._hand_over_verified(pooled)
            return
        self.errors += 1
        error = _describe(message.error)
        self._emit(log.WARNING, "health_check.failed", driver=pooled.id, error=error)
        self._start_close(pooled, "failed health check", discarded=True)
        self._dispatch()

    def _on_closed(self, message: Closed) -> None:
        if not message.finished and message.driver in self._closing:
            self._spawn(self._close(message.driver), Closed(message.driver, finished=False))
            return
        reason, discarded = self._closing.pop(message.driver, ("unknown", False))
        self.closed += 1
        if discarded:
            self.discarded += 1
        event = "driver.discarded" if discarded else "driver.closed"
        self._emit(log.INFO, event, driver=message.driver.id, reason=reason)

    def _on_tick(self) -> None:
        now = time.monotonic()
        if self._stopping is not None:
            self._close_abandoned()
            if now >= self._stopping.deadline:
                self._close_in_use("still in use at the close deadline")
            return
        config = self.config
        idle = self._idle
        while idle and self._total() > config.pool_min_size:
            if not idle[0].is_idle_for(now, config.max_idle_time):
                break
            self._start_close(idle.popleft(), "max_idle_time")
        for pooled in [p for p in idle if p.has_expired(now, config.max_lifetime)]:
            idle.remove(pooled)
            self._start_close(pooled, "max_lifetime")
        if now >= self._refill_at:
            while self._total() < config.pool_min_size:
                self._start_create(None)

    def _on_shutdown(self, message: Shutdown) -> None:
        if message.done is not None:
            self._stopped_callbacks.append(message.done)
        self._begin_stop(message.reason, message.timeout)

    # -- pool moves ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand idle drivers to waiters in order, and grow for those left."""
        waiters, idle = self._waiters, self._idle
        now = time.monotonic()
        interval = self.config.health_check_interval
        while waiters and idle:
            borrow = waiters[0]
            if borrow.waiter.done():  # cancelled; its Withdraw is on the way
                waiters.popleft()
                _disarm(borrow)
                self.cancellations += 1
                continue
            pooled = idle.pop()
            if pooled.needs_check(now, interval):
                self._start_check(pooled)
                continue
            waiters.popleft()
            self._give(pooled, borrow, now)
        short = len(waiters) - self._creating - len(self._checking)
        while short > 0 and self._total() < self.config.pool_max_size:
            self._start_create(waiters[len(waiters) - short].context)
            short -= 1

    def _give(self, pooled: PooledDriver, borrow: Borrow, now: float) -> None:
        _disarm(borrow)
        self._in_use[pooled] = borrow.task
        pooled.last_used = now
        self.borrows += 1
        borrow.waiter.set_result(pooled)

    def _hand_over_verified(self, pooled: PooledDriver) -> None:
        """A driver that has just proved itself goes to the oldest waiter unchecked."""
        borrow = self._next_waiter()
        if borrow is not None:
            self._give(pooled, borrow, time.monotonic())
        else:
            self._idle.append(pooled)
        self._dispatch()

    def _next_waiter(self) -> Borrow | None:
        while self._waiters:
            borrow = self._waiters.popleft()
            if not borrow.waiter.done():
                return borrow
            _disarm(borrow)
            self.cancellations += 1
        return None

    def _begin_stop(self, reason: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._stopping is not None:
            self._stopping.deadline = min(self._stopping.deadline, deadline)
            return
        self._stopping = _Stopping(reason, deadline)
        self._emit(log.INFO, "actor.closing", reason=reason)
        closed = BrokerClosed(f"the pool of loop {self.key} is closing ({reason})")
        while self._waiters:
            borrow = self._waiters.popleft()
            _disarm(borrow)
            _fail(borrow.waiter, closed)
        while self._idle:
            self._start_close(self._idle.pop(), reason)
        self._close_abandoned()
        if self._timer is not None:
            self._timer.cancel()
        self._arm_timer()

    def _close_abandoned(self) -> None:
        for pooled, task in list(self._in_use.items()):
            if task is not None and task.done():
                del self._in_use[pooled]
                self._start_close(pooled, "abandoned by its task")

    def _close_in_use(self, reason: str) -> None:
        for pooled in list(self._in_use):
            del self._in_use[pooled]
            self._start_close(pooled, reason)

    def _total(self) -> int:
        return len(self._idle) + len(self._in_use) + self._creating + len(self._checking)

    def _is_empty(self) -> bool:
        return self._total() == 0 and not self._closing

    # -- jobs ----------------------------------------------------------------

    def _start_create(self, context: contextvars.Context | None) -> None:
        self._creating += 1
        self._spawn(self._create(), Created(None, asyncio.CancelledError()), context)

    def _start_check(self, pooled: PooledDriver) -> None:
        self._checking.add(pooled)
        self._spawn(self._check(pooled), Checked(pooled, asyncio.CancelledError()))

    def _start_close(self, pooled: PooledDriver, reason: str, discarded: bool = False) -> None:
        self._closing[pooled] = (reason, discarded)
        self._spawn(self._close(pooled), Closed(pooled, finished=False))

    def _spawn(
        self,
        job: Coroutine[Any, Any, Message],
        if_cancelled: Message,
        context: contextvars.Context | None = None,
    ) -> None:
        """Run a job as a task of its own; its report always comes back as a message."""
        task = self.loop.create_task(job, context=context)
        self._jobs[task] = if_cancelled
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[Message]) -> None:
        # A task cancelled before its first step never ran its own handlers,
        # so the report is decided here, where every outcome is seen.
        report = self._jobs.pop(task)
        if not task.cancelled():
            error = task.exception()
            if error is None:
                report = task.result()
            else:
                self._emit(log.ERROR, "actor.error", error=repr(error), job=task.get_name())
        if not self.post(report) and isinstance(report, Created) and report.driver is not None:
            self.loop.create_task(_close_quietly(report.driver.driver))

    async def _create(self) -> Created:
        driver: AsyncDriver | None = None
        limit = self.config.connection_acquisition_timeout
        try:
            driver = self._factory(self.config)
            try:
                async with asyncio.timeout(limit):
                    await driver.verify_connectivity()
            except TimeoutError:
                # Report it the way the driver reports a server it cannot reach.
                raise ServiceUnavailable(f"could not connect within {limit:g} s") from None
        except BaseException as exc:
            if driver is not None:
                await _close_quietly(driver)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Created(None, exc, contextvars.copy_context())
        pooled = PooledDriver(driver, time.monotonic())
        return Created(pooled, None, contextvars.copy_context())

    async def _check(self, pooled: PooledDriver) -> Checked:
        try:
            async with asyncio.timeout(self.config.health_check_timeout):
                await pooled.driver.verify_connectivity()
        except Exception as exc:
            return Checked(pooled, exc)
        return Checked(pooled)

    async def _close(self, pooled: PooledDriver) -> Closed:
        await _close_quietly(pooled.driver)
        return Closed(pooled)

    # -- mailbox -------------------------------------------------------------

    def post(self, message: Message) -> bool:
        """Deliver a message from this loop's own thread. False once the actor has stopped."""
        try:
            self._inbox.put_nowait(message)
        except janus.AsyncQueueShutDown:
            return False
        bell = self._bell
        if bell is not None and not bell.done():
            bell.set_result(None)
        return True

    def post_threadsafe(self, message: Message) -> bool:
        """Deliver a message from any thread. False if it can never be read."""
        try:
            self._outside_inbox.put(message)
        except janus.SyncQueueShutDown:
            return False
        try:
            self.loop.call_soon_threadsafe(self._ring)
        except RuntimeError:  # the loop is closed: nobody will read it
            return False
        return True

    def post_soon(self, message: Message) -> bool:
        """Deliver a message from a finalizer, in any thread. False if the loop is closed.

        It takes no lock and never blocks: the collector may run a finalizer
        inside the mailbox's own critical section, on the loop's thread. The
        loop posts the message on its next iteration. ``call_soon_threadsafe``
        only appends to a deque and writes a byte to the loop's wake-up socket.
        """
        try:
            self.loop.call_soon_threadsafe(self.post, message)
        except RuntimeError:  # the loop is closed: nobody will read it
            return False
        return True

    def _ring(self) -> None:
        bell = self._bell
        if bell is not None and not bell.done():
            bell.set_result(None)

    def _expire(self, borrow: Borrow) -> None:
        borrow.expiry = None
        self.post(Withdraw(borrow))

    def _arm_timer(self) -> None:
        self._timer = self.loop.call_later(self._tick_interval(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._arm_timer()  # first: the pending timer is what keeps the actor alive
        self.post(Tick())

    def _tick_interval(self) -> float:
        if self._stopping is not None:
            return _STOPPING_TICK
        config = self.config
        limits = [1.0] + [v / 2 for v in (config.max_idle_time, config.max_lifetime) if v]
        return max(0.01, min(limits))

    def _finish(self, loop_ending: bool) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        closed = BrokerClosed(f"the pool of loop {self.key} has stopped")
        for borrow in self._waiters:
            _disarm(borrow)
            _fail(borrow.waiter, closed)
        self._waiters.clear()
        # Refuse new mail, then answer what is already there.
        self._mailbox.shutdown()
        while True:
            try:
                message = self._inbox.get_nowait()
            except (asyncio.QueueEmpty, janus.AsyncQueueShutDown):
                break
            if isinstance(message, StatsRequest):
                message.reply(self.snapshot())
            elif isinstance(message, Shutdown) and message.done is not None:
                self._stopped_callbacks.append(message.done)
            elif isinstance(message, Borrow):
                _fail(message.waiter, closed)
        self._emit(log.INFO, "actor.stopped", created=self.created, closed=self.closed)
        self._on_stopped(self, loop_ending)
        for callback in self._stopped_callbacks:
            try:
                callback()
            except Exception as exc:
                self._emit(log.ERROR, "actor.error", error=repr(exc))

    # -- reading -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's counters (read it in the loop's thread for a consistent view)."""
        if self._finished:
            state = "stopped"
        elif self._stopping is not None:
            state = "closing"
        else:
            state = "open"
        return {
            "loop": self.key,
            "thread": self.thread_name,
            "state": state,
            "available": len(self._idle),
            "in_use": len(self._in_use),
            "creating": self._creating,
            "checking": len(self._checking),
            "closing": len(self._closing),
            "total": self._total(),
            "waiting": len(self._waiters),
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
            "available": len(self._idle),
            "in_use": len(self._in_use),
            "creating": self._creating,
            "waiting": len(self._waiters),
            "total": self._total(),
        }

    def _emit(
        self, level: int, event: str, context: contextvars.Context | None = None, **fields: Any
    ) -> None:
        """Log an event; in ``context`` when it belongs to a borrower's task."""
        if not log.enabled(level):
            return
        fields.update(self.log_fields())
        if context is None:
            log.emit(level, event, **fields)
        else:
            context.run(log.emit, level, event, **fields)

    def __repr__(self) -> str:
        return f"<Actor {self.key} total={self._total()} in_use={len(self._in_use)}>"


def _fail(waiter: asyncio.Future[Any], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def _disarm(borrow: Borrow) -> None:
    if borrow.expiry is not None:
        borrow.expiry.cancel()
        borrow.expiry = None


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "none"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _close_quietly(driver: AsyncDriver) -> None:
    try:
        await driver.close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the driver is being dropped either way
        if log.enabled(log.DEBUG):
            log.emit(log.DEBUG, "driver.close_error", error=_describe(exc))
