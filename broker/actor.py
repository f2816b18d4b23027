"""One event loop's pool of drivers, owned and served by one actor.

The actor is a task in its loop. Everything that changes the pool happens
while it handles a message from its mailbox (:mod:`broker.mailbox`):
borrowers post from the loop's own thread, other threads through the
mailbox's sync side. The actor never waits on I/O itself: creating,
checking and closing a driver are jobs (:mod:`broker.jobs`), tasks of their
own that report back with a message.

The request protocol lives here, written once: :meth:`Actor.request` and
:meth:`Actor.abandon` (post, and withdraw or give back when the borrower
stops waiting), :meth:`Actor.give_back`, :meth:`Actor.ask` (readiness waits
and checks) and :meth:`Actor.tell`.

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

from broker import jobs, log
from broker.asyncio_internals import running_loop
from broker.auth_guard import AuthGuard
from broker.background import Background
from broker.config import Neo4jConnectionConfig
from broker.errors import BrokerClosed
from broker.jobs import DriverFactory
from broker.loop_end import end_with_loop
from broker.mailbox import Mailbox
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
from broker.pool import Pool
from broker.pooled import PooledDriver
from broker.stats import PoolStats

__all__ = ["Actor", "DriverFactory"]

_STOPPING_TICK = 0.05


class Actor:
    """Serves one event loop's pool. Create it in that loop, then :meth:`start` it.

    The pool (:class:`~broker.pool.Pool`) decides; the actor reads the
    mailbox, keeps the time, runs the jobs the pool asks for and answers the
    callers (it is the pool's :class:`~broker.effects.Effects`).
    """

    #: How mail reaches the actor (benchmarks compare other mailboxes).
    mailbox_class: type[Mailbox[Message]] = Mailbox

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
        auth_guard: AuthGuard | None = None,
    ) -> None:
        self.config = config
        self._guard = auth_guard or AuthGuard(
            config.uri, config.username, config.auth_retry_first, config.auth_retry_max
        )
        self.loop = loop
        self.key = key
        self.thread_name = threading.current_thread().name
        self._factory = driver_factory
        self._on_stopped = on_stopped
        # The actor's own context: a drain on a sender's stack runs in it too.
        self._context = contextvars.Context()
        self.mailbox: Mailbox[Message] = self.mailbox_class(
            loop, self._context, self._handle, self._failed, self._unread
        )
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Tasks that report to nobody; closings of drivers our timeouts gave up
        # on linger: the pool has stopped only once they end.
        self._background = Background(loop, self._lingered)
        # Each job task with the report to send if it is cancelled before reporting.
        self._jobs: dict[asyncio.Task[Message], Message] = {}
        self.pool = Pool(config, self, key, self.thread_name, sizes=sizes, generation=generation)
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._finished = False
        #: Cancelled while serving: it closes its drivers and a new actor serves the loop.
        self.retiring = False

    # -- the request protocol (callers in the loop, or any thread) --------------

    def request(self, timeout: float) -> Borrow:
        """Ask for a driver, from a borrower in this loop.

        The borrower awaits ``request.waiter`` (at most ``timeout`` seconds),
        and calls :meth:`abandon` if that await raises anything. (Two calls
        around the borrower's own await, rather than a coroutine of ours: a
        borrow then costs one coroutine, the borrower's.)
        """
        loop = self.loop
        waiter: asyncio.Future[PooledDriver] = loop.create_future()
        request = Borrow(waiter, timeout, asyncio.current_task(loop), contextvars.copy_context())
        if not self.mailbox.post(request):
            raise BrokerClosed(f"the pool of loop {self.key} has stopped")
        return request

    def abandon(self, request: Borrow) -> None:
        """The borrower stopped waiting: withdraw the request, or give back what it got.

        Also for a GeneratorExit from the collector closing the borrower:
        posting never waits on a lock (Mailbox.post).
        """
        waiter = request.waiter
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            # Handed over just as the borrower was cancelled: give it straight back.
            self.mailbox.post(Return(waiter.result()))
        elif waiter.cancelled():
            self.mailbox.post(Withdraw(request))

    def give_back(self, pooled: PooledDriver, broken: bool) -> bool:
        """Return a borrowed driver, from any thread. False if the pool has stopped."""
        if running_loop() is self.loop:
            return self.mailbox.post(Return(pooled, broken))
        return self.mailbox.post_threadsafe(Return(pooled, broken))

    def give_back_soon(self, pooled: PooledDriver, broken: bool) -> bool:
        """:meth:`give_back` for a finalizer: takes no lock, posts on the loop's next turn."""
        return self.mailbox.post_soon(Return(pooled, broken))

    async def ask(self, request: WaitReady | CheckNow) -> Any:
        """Post a request from this loop and wait for its answer; withdraw it if cancelled."""
        if not self.mailbox.post(request):
            raise BrokerClosed(f"the pool of loop {self.key} has stopped")
        try:
            return await request.waiter
        except asyncio.CancelledError:
            if isinstance(request, WaitReady) and request.waiter.cancelled():
                self.mailbox.post(Withdraw(request))
            raise

    def tell(self, message: Resize | Drain | Shutdown | StatsRequest) -> bool:
        """Deliver a message from any thread. False if it can never be read."""
        return self.mailbox.send(message, running_loop())

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
    def context(self) -> contextvars.Context:
        """The actor's own context, in which every drain of its mailbox runs."""
        return self._context

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
                # asyncio.run() ending the loop, or code that cancels every
                # other task while its loop goes on: close every driver here,
                # now. A later borrow in this loop starts a new actor (one
                # born while the loop ends is closed by loop_end's guard).
                loop_ending = self.retiring = True
                self._begin_stop("cancelled", self.config.close_timeout)
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
        pool, mailbox = self.pool, self.mailbox
        while True:
            mailbox.drain()
            if pool.stopping is not None and pool.is_empty() and not self._background.lingering:
                return
            await mailbox.wait()

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
                pool.creation_ended(message, time.monotonic())
            case Checked():
                pool.check_ended(message, time.monotonic())
            case Closed():
                self._on_closed(message)
            case Tick():
                pool.tick(time.monotonic())
                self._end_lingering(time.monotonic())
            case StatsRequest():
                message.reply(self.snapshot())
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

    def _failed(self, error: BaseException, message: Message) -> None:
        self.emit(log.ERROR, "actor.error", error=repr(error), message=type(message).__name__)

    def _arm_expiry(self, request: Borrow | WaitReady) -> None:
        if not request.waiter.done() and request.timeout != float("inf"):
            request.expiry = self.loop.call_later(request.timeout, self._expire, request)

    def _expire(self, request: Borrow | WaitReady) -> None:
        request.expiry = None
        self.mailbox.post(Withdraw(request))

    def _on_closed(self, message: Closed) -> None:
        if not message.finished and self.pool.is_closing(message.driver):
            # Cancelled before it could run (the loop is ending): close it again.
            self._spawn(jobs.close(message.driver), Closed(message.driver, finished=False))
            return
        self.pool.close_ended(message.driver)

    def _on_shutdown(self, message: Shutdown) -> None:
        if message.done is not None:
            self._stopped_callbacks.append(message.done)
        self._begin_stop(message.reason, message.timeout)

    def _begin_stop(self, reason: str, timeout: float) -> None:
        if not self.pool.stop(reason, time.monotonic() + timeout):
            return
        # After a drain in our place: a stopping actor decides itself when it has stopped.
        self.mailbox.wake_after_drain = True
        if self._timer is not None:
            self._timer.cancel()
        self._arm_timer()

    # -- what the pool has us do (Effects) --------------------------------------

    def start_create(
        self, context: contextvars.Context | None, generation: int, started: float, verify: bool
    ) -> None:
        """Make, verify (if ``verify``) and prepare a driver in a job of its own."""
        job = jobs.create(
            self.config,
            self._factory,
            self._guard,
            generation,
            started,
            verify,
            self._background.linger,
        )
        self._spawn(job, Created(None, asyncio.CancelledError(), started=started), context)

    def start_check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        """Run ``on_return`` and verify a driver in a job of its own."""
        job = jobs.check(self.config, self._guard, pooled, hook, verify)
        self._spawn(job, Checked(pooled, asyncio.CancelledError()))

    def start_close(self, pooled: PooledDriver) -> None:
        """Close a driver in a job of its own."""
        self._spawn(jobs.close(pooled), Closed(pooled, finished=False))

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

    def reconnect_failed(self, stats: PoolStats) -> None:
        """Run the application's ``reconnect_failed`` callback (async ones as a task)."""
        callback = self.config.reconnect_failed
        if callback is None:
            return
        try:
            outcome = callback(stats)
            if inspect.isawaitable(outcome):
                self._background.detach(self._await_callback(outcome))
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
        if not self.mailbox.post(report) and isinstance(report, Created) and report.driver:
            self._background.detach(jobs.close_quietly(report.driver.driver))

    def _lingered(self) -> None:
        self.mailbox.post(Tick())  # a stopping actor may now be done

    def _end_lingering(self, now: float) -> None:
        stopping = self.pool.stopping
        if stopping is not None and now >= stopping.deadline:
            self._background.cancel_lingering()

    # -- the clock and the end -------------------------------------------------

    def _arm_timer(self) -> None:
        self._timer = self.loop.call_later(self._tick_interval(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._arm_timer()  # first: the pending timer is what keeps the actor alive
        self.mailbox.post(Tick())

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
        self.pool.fail_waiting(self._stopped_error())
        for message in self.mailbox.shut():  # refuse new mail, answer what is there
            if isinstance(message, Shutdown) and message.done is not None:
                self._stopped_callbacks.append(message.done)  # called once we have stopped
            else:
                self._unread(message)
        counters = self.pool.counters
        self.emit(log.INFO, "actor.stopped", created=counters.created, closed=counters.closed)
        self._on_stopped(self, loop_ending)
        for callback in self._stopped_callbacks:
            try:
                callback()
            except Exception as exc:
                self.emit(log.ERROR, "actor.error", error=repr(exc))

    def _stopped_error(self) -> BrokerClosed:
        return BrokerClosed(f"the pool of loop {self.key} has stopped")

    def _unread(self, message: Message) -> None:
        """Answer mail the actor will never handle, so that no sender waits for ever."""
        match message:
            case StatsRequest():
                message.reply(self.snapshot())
            case Shutdown(done=done) if done is not None:
                done()
            case Borrow() | WaitReady() | CheckNow():
                _fail(message.waiter, self._stopped_error())
            case Created(driver=pooled) if pooled is not None:
                self._background.detach(jobs.close_quietly(pooled.driver))
            case _:
                pass  # returns and job reports of drivers already closed

    # -- reading -------------------------------------------------------------

    def snapshot(self) -> PoolStats:
        """The pool's counters (read it in the loop's thread for a consistent view)."""
        return self.pool.snapshot(time.monotonic())

    def snapshot_here(self) -> PoolStats:
        """:meth:`snapshot` on the loop's thread, outside the actor: no drain runs in the middle."""
        with self.mailbox.hold():
            return self.snapshot()

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
