"""One event loop's pool of drivers, owned and served by one actor.

The actor is a task in its loop. Everything that changes the pool happens
while it handles a message from its janus mailbox: borrowers post from the
loop's own thread through the async side, other threads through the sync
side. The actor never waits on I/O itself: creating, checking and closing a
driver are jobs (tasks of their own) that report back with a message.

The actor drains its mailbox in batches and, when it is empty, parks on a
future of its own loop. Senders in other threads wake it with
``call_soon_threadsafe``. A sender in the loop itself, finding the actor
parked, drains the mailbox on the spot, in the actor's place and context:
the message still goes through the mailbox, in order, and the pool is still
changed only on the loop's thread, one message at a time. So a borrow that
finds an idle driver, and every return, are served without a trip through
the loop (and never pay for janus's cross-thread notifier task).

The actor's maintenance timer is scheduled on its loop, so the loop holds
the actor (and the actor its loop) and nothing else needs to: the process
registry keeps only weak references. When the loop is closed or dropped, the
actor goes with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
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
    CheckNow,
    Closed,
    Created,
    Drain,
    Message,
    Request,
    Resize,
    Return,
    Shutdown,
    StatsRequest,
    Tick,
    WaitReady,
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
        *,
        sizes: tuple[int, int, int] | None = None,
        generation: int = 0,
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
        # janus guards both sides with this one lock (see _mailbox_busy).
        self._mailbox_lock = self._mailbox._sync_mutex
        self._bell: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # The actor's own context: a drain on a sender's stack runs in it too.
        self._context = contextvars.Context()
        # False only while the actor is parked and nobody drains in its place.
        self._busy = True
        self._timer: asyncio.TimerHandle | None = None
        # Tasks that report to nobody (see _detach).
        self._detached: set[asyncio.Task[None]] = set()
        # Each job task with the report to send if it is cancelled before reporting.
        self._jobs: dict[asyncio.Task[Message], Message] = {}
        self.pool = Pool(config, self, key, self.thread_name, sizes=sizes, generation=generation)
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._finished = False
        #: Set by the broker once this pool's counters are part of its totals.
        self.folded = False
        #: Workspace preparations running in this loop (shared by concurrent callers).
        self.preparing: dict[str, asyncio.Future[str]] = {}

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Start serving; call from the loop's thread."""
        # A context of its own: the borrower that happened to start the actor
        # must not lend its context variables (a task id) to every later log line.
        self._task = self.loop.create_task(
            self._run(), name=f"broker-actor {self.key}", context=self._context
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
            self._busy = False  # a sender in this loop may now drain in our place
            try:
                await bell
            finally:
                self._busy = True
                self._bell = None

    def _drain(self, holds_mail: bool = False) -> None:
        inbox = self._inbox
        get, waiting = inbox.get_nowait, inbox.qsize  # only this loop takes mail out
        while holds_mail or waiting():
            holds_mail = False
            try:
                message = get()
            except asyncio.QueueEmpty:  # read meanwhile, by a drain a finalizer started
                return
            try:
                self._handle(message)
            except Exception as exc:  # a bug must not take the whole loop's pool down
                name = type(message).__name__
                self.emit(log.ERROR, "actor.error", error=repr(exc), message=name)

    def _drain_here(self) -> None:
        """Handle the mail now, on a sender's stack, while the actor is parked."""
        self._busy = True
        try:
            self._context.run(self._drain, True)  # the sender's message at least
        except RuntimeError:
            # The actor's context is entered: a finalizer runs inside the
            # actor's own step, just before it parks. It drains on waking.
            self._ring()
            return
        finally:
            self._busy = False
        if self.pool.stopping is not None:
            self._ring()  # the actor itself decides when it has stopped

    # -- messages --------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        pool = self.pool
        match message:
            case Borrow():
                pool.borrow(message, time.monotonic())
                if not message.waiter.done():  # served at once: no timer at all
                    self._arm_expiry(message)
            case Return():
                pool.returned(message.driver, message.broken, time.monotonic())
            case Withdraw():
                _disarm(message.request)
                pool.withdraw(message.request, time.monotonic())
            case Created():
                pool.creation_ended(
                    message.driver,
                    message.error,
                    message.context,
                    message.started,
                    message.seconds,
                    message.hook_failed,
                    time.monotonic(),
                )
            case Checked():
                pool.check_ended(
                    message.driver,
                    message.error,
                    message.hook_error,
                    message.verified,
                    time.monotonic(),
                )
            case Closed():
                self._on_closed(message)
            case Tick():
                pool.tick(time.monotonic())
            case StatsRequest():
                self._on_stats(message)
            case Shutdown():
                self._on_shutdown(message)
            case WaitReady():
                pool.wait_ready(message, time.monotonic())
                self._arm_expiry(message)
            case CheckNow():
                pool.check_all(message, time.monotonic())
            case Resize():
                pool.resize(message.min_size, message.max_size, message.version, time.monotonic())
            case Drain():
                pool.drain(message.generation, time.monotonic())

    def _arm_expiry(self, request: Borrow | WaitReady) -> None:
        if not request.waiter.done() and request.timeout != float("inf"):
            request.expiry = self.loop.call_later(request.timeout, self._expire, request)

    def _on_stats(self, message: StatsRequest) -> None:
        asker = message.pop_for
        if asker is None:
            message.reply(self.snapshot())
        elif asker.set_running_or_notify_cancel():
            # From here the asker can no longer give up: the reset and the
            # answer that carries it both happen, or (cancelled) neither does.
            message.reply(self.pool.pop_stats(time.monotonic()))

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

    def start_create(
        self, context: contextvars.Context | None, generation: int, started: float, verify: bool
    ) -> None:
        """Make, verify (if ``verify``) and prepare a driver in a job of its own."""
        if_cancelled = Created(None, asyncio.CancelledError(), started=started)
        self._spawn(self._create(generation, started, verify), if_cancelled, context)

    def start_check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        """Run ``on_return`` and verify a driver in a job of its own."""
        self._spawn(self._check(pooled, hook, verify), Checked(pooled, asyncio.CancelledError()))

    def start_close(self, pooled: PooledDriver) -> None:
        """Close a driver in a job of its own."""
        self._spawn(self._close(pooled), Closed(pooled, finished=False))

    def resolve(self, request: Request, value: Any) -> None:
        """Answer a caller (a driver for a borrower)."""
        if request.expiry is not None:
            _disarm(request)
        if not request.waiter.done():
            request.waiter.set_result(value)

    def refuse(self, request: Request, error: BaseException) -> None:
        """Fail a caller."""
        _disarm(request)
        _fail(request.waiter, error)

    def forget(self, request: Request) -> None:
        """Drop the timer of a caller that was cancelled."""
        _disarm(request)

    def reconnect_failed(self, stats: dict[str, Any]) -> None:
        """Run the application's ``reconnect_failed`` callback (async ones as a task)."""
        callback = self.config.reconnect_failed
        if callback is None:
            return
        try:
            outcome = callback(stats)
            if inspect.isawaitable(outcome):
                self._detach(self._await_callback(outcome))
        except Exception as exc:
            self.emit(log.ERROR, "actor.error", error=repr(exc), callback="reconnect_failed")

    async def _await_callback(self, outcome: Any) -> None:
        try:
            await outcome
        except Exception as exc:
            self.emit(log.ERROR, "actor.error", error=repr(exc), callback="reconnect_failed")

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
            self._detach(_close_quietly(report.driver.driver))

    def _detach(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that reports to nobody, held until it ends.

        The loop keeps only weak references to tasks: an unheld one could be
        collected before it finishes.
        """
        task = self.loop.create_task(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _create(self, generation: int, started: float, verify: bool) -> Created:
        driver: AsyncDriver | None = None
        config = self.config
        limit = config.connection_acquisition_timeout
        began = time.monotonic()
        seconds = 0.0
        try:
            try:
                async with asyncio.timeout(limit):
                    if config.credentials is not None:
                        config = config.for_driver(await config.auth_for_new_driver())
                    driver = self._factory(config)
                    if verify:
                        await driver.verify_connectivity()
            except TimeoutError:
                # Report it the way the driver reports a server it cannot reach.
                raise ServiceUnavailable(f"could not connect within {limit:g} s") from None
            seconds = time.monotonic() - began
        except BaseException as exc:
            if driver is not None:
                await _close_quietly(driver)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Created(None, exc, contextvars.copy_context(), started)
        hook = config.on_create
        if hook is not None:
            try:
                async with asyncio.timeout(limit):
                    await hook(driver)
            except BaseException as exc:
                await _close_quietly(driver)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return Created(None, exc, contextvars.copy_context(), started, seconds, True)
        pooled = PooledDriver(driver, time.monotonic(), generation)
        return Created(pooled, None, contextvars.copy_context(), started, seconds)

    async def _check(self, pooled: PooledDriver, hook: bool, verify: bool) -> Checked:
        hook_error: Exception | None = None
        timeout = self.config.health_check_timeout
        on_return = self.config.on_return
        if hook and on_return is not None:
            try:
                async with asyncio.timeout(timeout):
                    await on_return(pooled.driver)
            except Exception as exc:
                hook_error = exc
        if not verify and hook_error is None:
            return Checked(pooled, verified=False)
        try:
            async with asyncio.timeout(timeout):
                await pooled.driver.verify_connectivity()
        except Exception as exc:
            return Checked(pooled, exc, hook_error)
        return Checked(pooled, None, hook_error)

    async def _close(self, pooled: PooledDriver) -> Closed:
        await _close_quietly(pooled.driver)
        return Closed(pooled)

    # -- mailbox -------------------------------------------------------------

    def send(self, message: Message) -> bool:
        """Deliver a message from any thread, by the right side of the mailbox."""
        if asyncio._get_running_loop() is self.loop:
            return self.post(message)
        return self.post_threadsafe(message)

    def post(self, message: Message) -> bool:
        """Deliver a message from this loop's own thread. False once the actor has stopped.

        If the actor is parked, the mailbox is drained at once, here (see the
        module's docstring); otherwise the actor reads it on its next wake-up.
        """
        lock = self._mailbox_lock  # as _mailbox_busy(), inline: this is every borrow's path
        if not lock.acquire(blocking=False):
            return self.post_soon(message)
        lock.release()
        try:
            self._inbox.put_nowait(message)  # raises unless called in the running loop
        except janus.AsyncQueueShutDown:
            return False
        bell = self._bell
        if bell is not None and not bell.done():
            if self._busy:
                # Inside a drain: a callback, a log processor or an eager task
                # run by a message's handling. The drain reads this one too.
                bell.set_result(None)
            else:
                self._drain_here()
        return True

    def post_threadsafe(self, message: Message) -> bool:
        """Deliver a message from any thread. False if it can never be read."""
        if self._mailbox_busy():
            return self.post_soon(message)
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
        """Deliver a message from anywhere, a finalizer included. False if the loop is closed.

        It takes no lock and never blocks: ``call_soon_threadsafe`` only
        appends to a deque and writes a byte to the loop's wake-up socket. The
        loop posts the message on its next iteration.
        """
        try:
            self.loop.call_soon_threadsafe(self._post_later, message)
        except RuntimeError:  # the loop is closed: nobody will read it
            return False
        return True

    def _post_later(self, message: Message) -> None:
        if not self.post(message):  # the actor stopped meanwhile
            self._answer_unread(message, BrokerClosed(f"the pool of loop {self.key} has stopped"))

    def _answer_unread(self, message: Message, closed: BrokerClosed) -> None:
        """Answer mail the actor will never handle, so that no sender waits for ever."""
        match message:
            case StatsRequest():
                self._on_stats(message)
            case Shutdown(done=done) if done is not None:
                done()
            case Borrow() | WaitReady() | CheckNow():
                _fail(message.waiter, closed)
            case Created(driver=pooled) if pooled is not None:
                self._detach(_close_quietly(pooled.driver))
            case _:
                pass  # returns and job reports of drivers already closed

    def _mailbox_busy(self) -> bool:
        """Whether the mailbox's lock is taken at this moment.

        The collector runs finalizers wherever an allocation triggers it, even
        inside the mailbox's own critical section; a finalizer that gives a
        driver back would then wait for a lock its own thread holds, for ever.
        So a sender that finds the lock taken (by this thread or, briefly, by
        another) goes the lock-free way of :meth:`post_soon` instead of waiting.
        """
        lock = self._mailbox_lock
        if lock.acquire(blocking=False):
            lock.release()
            return False
        return True

    def _ring(self) -> None:
        bell = self._bell
        if bell is not None and not bell.done():
            bell.set_result(None)

    def _expire(self, request: Borrow | WaitReady) -> None:
        request.expiry = None
        self.post(Withdraw(request))

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
        self.pool.fail_waiting(closed)
        # Refuse new mail, then answer what is already there.
        self._mailbox.shutdown()
        while True:
            try:
                message = self._inbox.get_nowait()
            except (asyncio.QueueEmpty, janus.AsyncQueueShutDown):
                break
            if isinstance(message, Shutdown) and message.done is not None:
                self._stopped_callbacks.append(message.done)  # called once we have stopped
            else:
                self._answer_unread(message, closed)
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
        return self.pool.snapshot(time.monotonic())

    def pop_stats_here(self, now: float) -> dict[str, Any]:
        """The pool's ``pop_stats()``, on the loop's thread but outside the actor.

        No drain may run in the middle of it (one started by a finalizer
        that gives a driver back, say): mail posted meanwhile waits for the actor.
        """
        busy, self._busy = self._busy, True
        try:
            return self.pool.pop_stats(now)
        finally:
            self._busy = busy

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


def _disarm(request: Request) -> None:
    if request.expiry is not None:
        request.expiry.cancel()
        request.expiry = None


async def _close_quietly(driver: AsyncDriver) -> None:
    try:
        await driver.close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the driver is being dropped either way
        if log.enabled(log.DEBUG):
            log.emit(log.DEBUG, "driver.close_error", error=describe(exc))
