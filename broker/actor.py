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
from collections.abc import Callable, Coroutine
from typing import Any

import janus
from neo4j import AsyncDriver
from neo4j.exceptions import ServiceUnavailable

from broker import log
from broker.config import Neo4jConnectionConfig
from broker.connection import PooledDriver
from broker.errors import BrokerClosed
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
from broker.pool import Pool, describe

__all__ = ["Actor", "DriverFactory"]

#: Makes one (not yet connected) driver from a config.
DriverFactory = Callable[[Neo4jConnectionConfig], AsyncDriver]

_STOPPING_TICK = 0.05


class Actor:
    """Serves one event loop's pool. Create it in that loop, then :meth:`start` it.

    The pool (:class:`~broker.pool.Pool`) decides; the actor reads the
    mailbox, keeps the time, runs the jobs the pool asks for and answers the
    callers (it is the pool's :class:`~broker.pool.Effects`).
    """

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
        self.pool = Pool(config, self, key, self.thread_name)
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._finished = False
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
        self.emit(log.INFO, "actor.started")
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
                        self.pool.close_in_use("cancelled again while closing")
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
        pool = self.pool
        while True:
            self._drain()
            if pool.stopping is not None and pool.is_empty():
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
                self.emit(log.ERROR, "actor.error", error=repr(exc), message=name)

    # -- messages --------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        pool = self.pool
        match message:
            case Borrow():
                self._on_borrow(message)
            case Return():
                pool.returned(message.driver, message.broken, time.monotonic())
            case Withdraw():
                _disarm(message.borrow)
                pool.withdraw(message.borrow)
            case Created():
                pool.creation_ended(
                    message.driver, message.error, message.context, time.monotonic()
                )
            case Checked():
                pool.check_ended(message.driver, message.error, time.monotonic())
            case Closed():
                self._on_closed(message)
            case Tick():
                pool.tick(time.monotonic())
            case StatsRequest():
                message.reply(self.snapshot())
            case Shutdown():
                self._on_shutdown(message)

    def _on_borrow(self, borrow: Borrow) -> None:
        self.pool.borrow(borrow, time.monotonic())
        if not borrow.waiter.done() and borrow.timeout != float("inf"):
            borrow.expiry = self.loop.call_later(borrow.timeout, self._expire, borrow)

    def _on_closed(self, message: Closed) -> None:
        if not message.finished and self.pool.is_closing(message.driver):
            # Cancelled before it could run (the loop is ending): close it again.
            self._spawn(self._close(message.driver), Closed(message.driver, finished=False))
            return
        self.pool.close_ended(message.driver)

    def _on_shutdown(self, message: Shutdown) -> None:
        if message.done is not None:
            self._stopped_callbacks.append(message.done)
        self._begin_stop(message.reason, message.timeout)

    def _begin_stop(self, reason: str, timeout: float) -> None:
        if not self.pool.stop(reason, time.monotonic() + timeout):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._arm_timer()

    # -- what the pool has us do (Effects) --------------------------------------

    def start_create(self, context: contextvars.Context | None) -> None:
        """Make and verify a driver in a job of its own."""
        self._spawn(self._create(), Created(None, asyncio.CancelledError()), context)

    def start_check(self, pooled: PooledDriver) -> None:
        """Verify a driver in a job of its own."""
        self._spawn(self._check(pooled), Checked(pooled, asyncio.CancelledError()))

    def start_close(self, pooled: PooledDriver) -> None:
        """Close a driver in a job of its own."""
        self._spawn(self._close(pooled), Closed(pooled, finished=False))

    def resolve(self, borrow: Borrow, pooled: PooledDriver) -> None:
        """Hand a driver to its borrower."""
        _disarm(borrow)
        borrow.waiter.set_result(pooled)

    def refuse(self, borrow: Borrow, error: BaseException) -> None:
        """Fail a borrower."""
        _disarm(borrow)
        _fail(borrow.waiter, error)

    def forget(self, borrow: Borrow) -> None:
        """Drop the timer of a borrower that was cancelled."""
        _disarm(borrow)

    # -- jobs ----------------------------------------------------------------

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
                self.emit(log.ERROR, "actor.error", error=repr(error), job=task.get_name())
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
        if self.pool.stopping is not None:
            return _STOPPING_TICK
        config = self.config
        limits = [1.0] + [v / 2 for v in (config.max_idle_time, config.max_lifetime) if v]
        return max(0.01, min(limits))

    def _finish(self, loop_ending: bool) -> None:
        self._finished = True
        self.pool.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        closed = BrokerClosed(f"the pool of loop {self.key} has stopped")
        self.pool.fail_waiters(closed)
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
        self.emit(log.INFO, "actor.stopped", created=self.pool.created, closed=self.pool.closed)
        self._on_stopped(self, loop_ending)
        for callback in self._stopped_callbacks:
            try:
                callback()
            except Exception as exc:
                self.emit(log.ERROR, "actor.error", error=repr(exc))

    # -- reading -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's counters (read it in the loop's thread for a consistent view)."""
        return self.pool.snapshot()

    def log_fields(self) -> dict[str, Any]:
        """The loop key, thread name and pool counters every event carries."""
        return self.pool.log_fields()

    def emit(
        self, level: int, event: str, context: contextvars.Context | None = None, **fields: Any
    ) -> None:
        """Log an event; in ``context`` when it belongs to a borrower's task."""
        if not log.enabled(level):
            return
        fields.update(self.pool.log_fields())
        if context is None:
            log.emit(level, event, **fields)
        else:
            context.run(log.emit, level, event, **fields)

    def __repr__(self) -> str:
        pool = self.pool
        return f"<Actor {self.key} total={pool.total()} in_use={len(pool.in_use)}>"


def _fail(waiter: asyncio.Future[Any], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def _disarm(borrow: Borrow) -> None:
    if borrow.expiry is not None:
        borrow.expiry.cancel()
        borrow.expiry = None


async def _close_quietly(driver: AsyncDriver) -> None:
    try:
        await driver.close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the driver is being dropped either way
        if log.enabled(log.DEBUG):
            log.emit(log.DEBUG, "driver.close_error", error=describe(exc))
