"""The process-wide broker: one actor, and so one pool, per event loop.

A :class:`Broker` can be built anywhere, with or without a running loop, and
used from any thread. The first borrow inside a loop starts that loop's
actor; later borrows in the same loop go to the same actor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import neo4j

from broker import inherited, log
from broker.actor import Actor, DriverFactory
from broker.config import Neo4jConnectionConfig, check_sizes, check_timeout
from broker.connection import Connection
from broker.errors import BrokerClosed, BrokerError
from broker.histogram import HOLD_BUCKETS, WAIT_BUCKETS, Histogram
from broker.messages import (
    CheckNow,
    Drain,
    Message,
    Resize,
    Shutdown,
    StatsRequest,
    WaitReady,
    Withdraw,
)
from broker.pool import COUNTERS, Pool
from broker.registry import LoopRegistry, loop_key
from broker.workspace import check_workspace, prepare_workspace

if TYPE_CHECKING:
    from broker.loopsafe import LoopSafeDriver

__all__ = ["Broker", "default_driver_factory"]


# The driver's own constructor, taken before ``broker.patch_neo4j()`` can replace it.
_open_driver = neo4j.AsyncGraphDatabase.driver


def default_driver_factory(config: Neo4jConnectionConfig) -> neo4j.AsyncDriver:
    """A new, not yet connected, official async driver for ``config``."""
    return _open_driver(config.uri, **config.driver_kwargs())


class Broker:
    """Hands out pooled async Neo4j drivers, one pool per event loop.

    ``driver_factory`` replaces how a driver is made (tests use it to put a
    fault proxy in between, or a fake driver in unit tests).
    """

    def __init__(
        self,
        config: Neo4jConnectionConfig | None = None,
        *,
        driver_factory: DriverFactory | None = None,
    ) -> None:
        self.config = config if config is not None else Neo4jConnectionConfig.from_env()
        self._factory = driver_factory or default_driver_factory
        self._registry = LoopRegistry()
        # Each thread's last actor, weakly: a borrow's lookup without the registry.
        self._last_actor = threading.local()
        self._prepared: dict[str, str] = {}
        self._retired = dict.fromkeys(COUNTERS, 0.0)
        self._retired_histograms = _new_histograms()
        self._retired_lock = threading.Lock()
        # What every pool, present and future, must follow: sizes (with the
        # version that orders resizes) and the drain generation.
        self._settings_lock = threading.Lock()
        self._sizes = (self.config.pool_min_size, self.config.pool_max_size, 0)
        self._generation = 0
        preparer = self.config.database_preparer
        self._preparer = preparer or functools.partial(
            prepare_workspace, database=self.config.database, indexes=self.config.indexes
        )
        #: What a borrower is told to do once this broker is closed.
        self._closed_hint = "make a new Broker(config) to borrow again"
        _brokers.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Broker {self.config.uri} {state} loops={len(self._registry.actors())}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`aclose` has been called."""
        return self._registry.closed

    # -- borrowing -------------------------------------------------------------

    def borrow(self, timeout: float | None = None) -> Connection:
        """A driver from this loop's pool: ``await`` it or use ``async with``.

        Waits at most ``timeout`` seconds (default: ``config.borrow_timeout``)
        and then raises :class:`~broker.BorrowTimeout`.
        """
        return Connection(self, timeout)

    def driver(self) -> LoopSafeDriver:
        """A loop-safe stand-in for ``neo4j.AsyncDriver``, served by this broker's pools."""
        from broker.loopsafe import LoopSafeDriver

        return LoopSafeDriver(self)

    async def release(self, connection: Connection) -> None:
        """Give back a connection borrowed from this broker."""
        if not isinstance(connection, Connection):
            raise BrokerError(f"expected a Connection, got {type(connection).__name__}")
        if connection._broker is not self:
            raise BrokerError("this connection was borrowed from another broker")
        await connection.release()

    def _actor_for(self, loop: asyncio.AbstractEventLoop) -> Actor:
        last: weakref.ref[Actor] | None = getattr(self._last_actor, "ref", None)
        actor = last() if last is not None else None
        if actor is not None and actor.loop is loop and not actor.finished:
            return actor
        actor = self._registry.get(loop)
        if actor is None:
            try:
                actor = self._registry.start(loop, self._new_actor)
            except BrokerClosed:
                if not self.closed:
                    raise  # this loop is ending, the broker is not closed
                raise BrokerClosed(f"this broker is closed; {self._closed_hint}") from None
        self._last_actor.ref = weakref.ref(actor)
        return actor

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        with self._settings_lock:
            sizes, generation = self._sizes, self._generation
        return Actor(
            self.config,
            loop,
            loop_key(),
            self._factory,
            self._actor_stopped,
            sizes=sizes,
            generation=generation,
        )

    def _actor_stopped(self, actor: Actor, loop_ended: bool) -> None:
        # The counters move into the totals in one step, seen by totals() and
        # histograms() either before or after it, never half done: what they
        # report never goes back.
        pool = actor.pool
        with self._retired_lock:
            for name in COUNTERS:
                self._retired[name] += getattr(pool, name)
            self._retired_histograms["borrow_wait"].add(pool.wait_histogram)
            self._retired_histograms["hold"].add(pool.hold_histogram)
            actor.folded = True
        self._registry.retire(actor, loop_ended)

    # -- the pool of the calling loop ------------------------------------------

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until this loop's pool holds ``pool_min_size`` verified drivers.

        Starts them now if need be. Raises the error that stopped a driver
        from being made (``AuthError``, ``ServiceUnavailable`` ...) as soon
        as it happens, or :class:`~broker.BorrowTimeout` after ``timeout``
        seconds (default ``borrow_timeout``) saying what the pool was doing.
        A service can so fail fast at start.
        """
        timeout = self.config.borrow_timeout if timeout is None else check_timeout(timeout)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        await self._ask(loop, WaitReady(waiter, timeout))

    async def check(self) -> int:
        """Verify every idle driver of this loop's pool now; return how many were discarded.

        Drivers that fail are closed; the pool makes new ones as it needs them.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()
        discarded: int = await self._ask(loop, CheckNow(waiter))
        return discarded

    async def _ask(self, loop: asyncio.AbstractEventLoop, request: WaitReady | CheckNow) -> Any:
        actor = self._actor_for(loop)
        if not actor.post(request):
            raise BrokerClosed(f"the pool of loop {actor.key} has stopped")
        try:
            return await request.waiter
        except asyncio.CancelledError:
            if isinstance(request, WaitReady) and request.waiter.cancelled():
                actor.post(Withdraw(request))
            raise

    # -- every pool, from any thread -------------------------------------------

    def resize(self, min_size: int, max_size: int) -> None:
        """Change every loop's pool bounds, now and for loops to come (any thread).

        Growing starts drivers for waiting borrowers and up to the new
        minimum. Shrinking closes idle drivers above the new maximum at once
        and drivers in use as they come back: no new driver is made while a
        pool holds ``max_size`` or more. A loop that is not running applies
        it when it next runs. ``broker.config`` keeps the configured sizes;
        stats show the current ones.
        """
        check_sizes(min_size, max_size)
        with self._settings_lock:
            version = self._sizes[2] + 1
            self._sizes = (min_size, max_size, version)
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.resize", min_size=min_size, max_size=max_size)
        self._post_all(Resize(min_size, max_size, version))

    def drain(self) -> None:
        """Replace every driver of every loop (any thread): idle ones now, the others on return.

        For credential rotation (with ``credentials=``, new drivers
        authenticate afresh), a server failover or a new certificate.
        Borrowers are not disturbed: a driver in use closes only when it
        comes back, and the pool makes new ones as it needs them.
        """
        with self._settings_lock:
            self._generation += 1
            generation = self._generation
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.drain", generation=generation)
        self._post_all(Drain(generation))

    def _post_all(self, message: Message) -> None:
        for actor in self._registry.actors():
            actor.send(message)

    # -- workspaces ------------------------------------------------------------

    async def _prepare(self, actor: Actor, driver: neo4j.AsyncDriver, workspace: str) -> str:
        check_workspace(workspace)
        while True:
            cached = self._prepared.get(workspace)
            if cached is not None:
                return cached
            running = actor.preparing.get(workspace)
            if running is None:
                break
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not running.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller that was preparing it was cancelled: try ourselves.
        shared: asyncio.Future[str] = actor.loop.create_future()
        actor.preparing[workspace] = shared
        try:
            name = await self._preparer(driver, workspace)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                shared.cancel()
            else:
                shared.set_exception(exc)
                shared.exception()  # retrieved here; followers re-raise it
            raise
        finally:
            actor.preparing.pop(workspace, None)
        self._prepared[workspace] = name
        shared.set_result(name)
        return name

    # -- stats -----------------------------------------------------------------

    async def stats(
        self, timeout: float = 1.0, *, ask_others: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Counters of every live loop's pool, by loop key (call inside a loop).

        A loop that does not answer within ``timeout`` seconds is reported
        with ``responsive: False`` and counters read without its actor. With
        ``ask_others=False`` only this loop's actor is asked; other running
        loops are read as they stand (``responsive: False``), so a busy loop
        never delays the answer.
        """
        here = asyncio.get_running_loop()
        pending: dict[Actor, asyncio.Future[dict[str, Any]]] = {}
        for actor in self._registry.actors():
            if actor.loop is here:
                own: asyncio.Future[dict[str, Any]] = here.create_future()
                if actor.post(StatsRequest(functools.partial(_set_once, own))):
                    pending[actor] = own
            elif ask_others and actor.loop.is_running():
                other: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
                if actor.post_threadsafe(StatsRequest(functools.partial(_set_once, other))):
                    pending[actor] = asyncio.wrap_future(other)
        if pending:
            await asyncio.wait(pending.values(), timeout=timeout)
        return self._collect(pending, here)

    def stats_sync(
        self, timeout: float = 1.0, *, ask_others: bool = True
    ) -> dict[str, dict[str, Any]]:
        """:meth:`stats` for any thread, with or without a running loop.

        With ``ask_others=False`` no actor is asked and nothing waits.
        """
        here = asyncio._get_running_loop()
        pending: dict[Actor, concurrent.futures.Future[dict[str, Any]]] = {}
        for actor in self._registry.actors():
            if not ask_others or actor.loop is here or not actor.loop.is_running():
                continue  # cannot answer while we hold its thread, or while parked
            asked: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            if actor.post_threadsafe(StatsRequest(functools.partial(_set_once, asked))):
                pending[actor] = asked
        if pending:
            concurrent.futures.wait(pending.values(), timeout=timeout)
        return self._collect(pending, here)

    def pop_stats(self, timeout: float = 1.0) -> dict[str, dict[str, Any]]:
        """:meth:`stats_sync`, with each counter counted since the previous call (any thread).

        The counters of this view are reset, as in psycopg_pool; the counters
        of :meth:`stats`, :meth:`totals` and Prometheus keep growing. A loop
        that does not answer within ``timeout`` seconds is reported with
        ``responsive: False`` and left as it was.
        """
        here = asyncio._get_running_loop()
        pending: dict[Actor, concurrent.futures.Future[dict[str, Any]]] = {}
        for actor in self._registry.actors():
            if actor.loop is here or not actor.loop.is_running():
                continue  # read and reset below, from this thread
            asked: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            message = StatsRequest(functools.partial(_set_once, asked), pop_for=asked)
            if actor.post_threadsafe(message):
                pending[actor] = asked
        if pending:
            concurrent.futures.wait(pending.values(), timeout=timeout)
        result: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for actor in self._registry.actors():
            answer = pending.get(actor)
            if answer is None:
                # Our own loop (blocked by this call) or a loop that is not
                # running: nothing else touches its pool now.
                entry = (
                    actor.pop_stats_here(now) if actor.loop is here else actor.pool.pop_stats(now)
                )
                entry["responsive"] = True
            elif answer.cancel():
                entry = actor.pool.peek_stats(now)  # it never started: nothing was reset
                entry["responsive"] = False
            else:
                # Answered, or the actor is resetting now: its answer is on the way.
                entry = dict(answer.result(timeout=max(timeout, 1.0)))
                entry["responsive"] = True
            entry["loop_running"] = actor.loop.is_running()
            entry["loop_id"] = str(id(actor.loop))
            result[actor.key] = entry
        return result

    def _collect(
        self, answers: dict[Actor, Any], here: asyncio.AbstractEventLoop | None
    ) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for actor in self._registry.actors():
            answer = answers.get(actor)
            running = actor.loop.is_running()
            if answer is not None and answer.done() and not answer.cancelled():
                entry = dict(answer.result())
                entry["responsive"] = True
            else:
                # Not asked (its loop is parked, or it is ours and we block it,
                # or we chose not to) or no answer in time: read the counters.
                entry = actor.snapshot()
                entry["responsive"] = answer is None and (actor.loop is here or not running)
            entry["loop_running"] = running
            entry["loop_id"] = str(id(actor.loop))
            result[actor.key] = entry
        return result

    def totals(self) -> dict[str, int]:
        """Counters summed over every loop this broker ever served (they never go back)."""
        with self._retired_lock:
            sums = dict(self._retired)
            for pool in self._unfolded_pools():
                for name in COUNTERS:
                    sums[name] += getattr(pool, name)
        return {name: round(value) for name, value in sums.items()}

    def histograms(self) -> dict[str, Histogram]:
        """Borrow waits (``borrow_wait``) and hold times (``hold``), over every loop ever."""
        with self._retired_lock:
            sums = {name: h.copy() for name, h in self._retired_histograms.items()}
            for pool in self._unfolded_pools():
                sums["borrow_wait"].add(pool.wait_histogram)
                sums["hold"].add(pool.hold_histogram)
        return sums

    def _unfolded_pools(self) -> list[Pool]:
        """Pools whose counters are not in the retired sums yet (hold ``_retired_lock``)."""
        return [actor.pool for actor in self._registry.entries() if not actor.folded]

    # -- closing ---------------------------------------------------------------

    async def aclose(self, timeout: float | None = None) -> None:
        """Close every loop's pool; wait for the ones that can answer."""
        timeout = self.config.close_timeout if timeout is None else timeout
        here = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for actor, done in self._shutdown_all(timeout, here):
            if actor.loop is here or actor.loop.is_running():
                waits.append(
                    done if isinstance(done, asyncio.Future) else asyncio.wrap_future(done)
                )
        if waits:
            await asyncio.wait(waits, timeout=timeout + 1.0)

    async def _aclose_here(self, timeout: float | None = None) -> None:
        """Close the calling loop's pool only; a later borrow here starts a new one."""
        timeout = self.config.close_timeout if timeout is None else timeout
        here = asyncio.get_running_loop()
        actor = self._registry.get(here)
        if actor is None:
            return
        done: asyncio.Future[None] = here.create_future()
        if actor.post(Shutdown("pool closed", timeout, functools.partial(_set_once, done, None))):
            await asyncio.wait([done], timeout=timeout + 1.0)

    def close(self, timeout: float | None = None) -> None:
        """Close every loop's pool from any thread.

        Pools of running loops are waited for, up to about ``timeout``
        seconds. A pool whose loop is not running now (or is the caller's
        own) closes when its loop next runs, or when the loop ends.
        """
        timeout = self.config.close_timeout if timeout is None else timeout
        here = asyncio._get_running_loop()
        waits: list[concurrent.futures.Future[None]] = []
        for actor, done in self._shutdown_all(timeout, here):
            if actor.loop is not here and actor.loop.is_running():
                assert isinstance(done, concurrent.futures.Future)
                waits.append(done)
        if waits:
            concurrent.futures.wait(waits, timeout=timeout + 1.0)

    def _shutdown_all(
        self, timeout: float, here: asyncio.AbstractEventLoop | None
    ) -> list[tuple[Actor, asyncio.Future[None] | concurrent.futures.Future[None]]]:
        actors = self._registry.close()
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.closing", loops=len(actors), timeout=timeout)
        posted: list[tuple[Actor, asyncio.Future[None] | concurrent.futures.Future[None]]] = []
        for actor in actors:
            mine = here is not None and actor.loop is here
            done: asyncio.Future[None] | concurrent.futures.Future[None]
            done = (
                here.create_future() if here is not None and mine else concurrent.futures.Future()
            )
            message = Shutdown("broker closed", timeout, functools.partial(_set_once, done, None))
            if actor.send(message):
                posted.append((actor, done))
        return posted

    def _after_fork(self) -> None:
        # The parent's loops, drivers and sockets are not ours to use or close
        # (nor to let the collector close), and its counters are not this process's.
        actors = self._registry.forget_all()
        self._last_actor = threading.local()
        inherited.keep(actors)
        inherited.detach(actor.loop for actor in actors)
        self._retired_lock = threading.Lock()
        self._retired = dict.fromkeys(COUNTERS, 0.0)
        self._retired_histograms = _new_histograms()
        self._settings_lock = threading.Lock()


def _new_histograms() -> dict[str, Histogram]:
    return {"borrow_wait": Histogram(WAIT_BUCKETS), "hold": Histogram(HOLD_BUCKETS)}


def _set_once(
    future: asyncio.Future[Any] | concurrent.futures.Future[Any], value: Any = None
) -> None:
    if isinstance(future, asyncio.Future):
        if not future.done():
            future.set_result(value)
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # the asker gave up
        future.set_result(value)


_brokers: weakref.WeakSet[Broker] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for broker in list(_brokers):
        broker._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
