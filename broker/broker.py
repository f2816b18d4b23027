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
from typing import Any, cast

import neo4j

from broker import inherited, log
from broker.actor import Actor, DriverFactory
from broker.asyncio_internals import running_loop
from broker.auth_guard import AuthGuard
from broker.config import Neo4jConnectionConfig, check_sizes, check_timeout
from broker.connection import Connection
from broker.effects import Effects
from broker.errors import BrokerClosed, BrokerError
from broker.histogram import Histogram
from broker.loopsafe import LoopSafeDriver
from broker.messages import CheckNow, Drain, Resize, Shutdown, StatsRequest, WaitReady
from broker.pool import Pool
from broker.registry import LoopRegistry, loop_key
from broker.stats import PoolStats, Totals
from broker.workspace import Preparations, prepare_workspace

__all__ = ["Broker", "default_driver_factory"]

_Answer = concurrent.futures.Future[PoolStats]


# The driver's own constructor, taken before ``broker.patch_neo4j()`` can replace it.
_open_driver = neo4j.AsyncGraphDatabase.driver


def default_driver_factory(config: Neo4jConnectionConfig) -> neo4j.AsyncDriver:
    """A new, not yet connected, official async driver for ``config``."""
    return _open_driver(config.uri, **config.driver_kwargs())


class _Settings:
    """What every pool, present and future, follows: sizes (with the version
    that orders resizes from several threads) and the drain generation."""

    def __init__(self, config: Neo4jConnectionConfig) -> None:
        self.lock = threading.Lock()
        self.sizes = (config.pool_min_size, config.pool_max_size, 0)
        self.generation = 0

    def current(self) -> tuple[tuple[int, int, int], int]:
        with self.lock:
            return self.sizes, self.generation

    def resize(self, min_size: int, max_size: int) -> int:
        with self.lock:
            version = self.sizes[2] + 1
            self.sizes = (min_size, max_size, version)
            return version

    def next_generation(self) -> int:
        with self.lock:
            self.generation += 1
            return self.generation


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
        #: How this broker makes a driver.
        self.driver_factory: DriverFactory = driver_factory or default_driver_factory
        self._registry = LoopRegistry()
        # Each thread's last actor, weakly: a borrow's lookup without the registry.
        self._last_actor = threading.local()
        self._totals = Totals()
        self._settings = _Settings(self.config)
        config = self.config
        #: Failed logins, remembered across every loop of this broker.
        self.auth_guard = AuthGuard(
            config.uri, config.username, config.auth_retry_first, config.auth_retry_max
        )
        preparer = self.config.database_preparer or functools.partial(
            prepare_workspace, database=self.config.database, indexes=self.config.indexes
        )
        #: Each workspace's database, prepared once per broker.
        self.workspaces = Preparations(preparer)
        #: What a borrower is told to do once this broker is closed.
        self.closed_hint = "make a new Broker(config) to borrow again"
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
        return LoopSafeDriver(self)

    async def release(self, connection: Connection) -> None:
        """Give back a connection borrowed from this broker."""
        if not isinstance(connection, Connection):
            raise BrokerError(f"expected a Connection, got {type(connection).__name__}")
        if not connection.borrowed_from(self):
            raise BrokerError("this connection was borrowed from another broker")
        await connection.release()

    async def prepare_workspace(self, driver: neo4j.AsyncDriver, workspace: str) -> str:
        """``workspace``'s database, prepared with ``driver`` once per broker."""
        return await self.workspaces.prepare(driver, workspace)

    # -- actors ----------------------------------------------------------------

    def actor_for(self, loop: asyncio.AbstractEventLoop) -> Actor:
        """``loop``'s actor, started if it has none (call in that loop)."""
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
                raise BrokerClosed(f"this broker is closed; {self.closed_hint}") from None
        self._last_actor.ref = weakref.ref(actor)
        return actor

    def actor_of(self, loop: asyncio.AbstractEventLoop) -> Actor | None:
        """``loop``'s running actor, if it has one (never starts one)."""
        return self._registry.get(loop)

    def actors(self) -> list[Actor]:
        """Every live actor (one per loop with a pool), at this moment."""
        return self._registry.actors()

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        sizes, generation = self._settings.current()
        return Actor(
            self.config,
            loop,
            loop_key(),
            self.driver_factory,
            self._actor_stopped,
            sizes=sizes,
            generation=generation,
            auth_guard=self.auth_guard,
        )

    def _actor_stopped(self, actor: Actor, cancelled: bool) -> None:
        self._totals.fold(actor.pool)
        self._registry.retire(actor)

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
        await self.actor_for(loop).ask(WaitReady(loop.create_future(), timeout))

    async def check(self) -> int:
        """Verify every idle driver of this loop's pool now; return how many were discarded.

        Drivers that fail are closed; the pool makes new ones as it needs them.
        """
        loop = asyncio.get_running_loop()
        discarded: int = await self.actor_for(loop).ask(CheckNow(loop.create_future()))
        return discarded

    async def close_here(self, timeout: float | None = None) -> None:
        """Close the calling loop's pool only; a later borrow here starts a new one."""
        timeout = self.config.close_timeout if timeout is None else timeout
        here = asyncio.get_running_loop()
        actor = self._registry.get(here)
        if actor is None:
            return
        done: asyncio.Future[None] = here.create_future()
        if actor.tell(Shutdown("pool closed", timeout, functools.partial(_set_once, done, None))):
            await asyncio.wait([done], timeout=timeout + 1.0)

    def pool_stats(self, loop: asyncio.AbstractEventLoop | None) -> PoolStats:
        """``loop``'s pool as it stands; before its first borrow, zeros and the current sizes."""
        actor = self._registry.get(loop) if loop is not None else None
        if actor is not None:
            return actor.snapshot()
        sizes, generation = self._settings.current()
        thread = threading.current_thread().name
        # A pool that is only read never calls its effects: it needs no actor.
        pool = Pool(
            self.config, cast(Effects, None), "", thread, sizes=sizes, generation=generation
        )
        entry = pool.snapshot(time.monotonic())
        entry["loop"] = None
        return entry

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
        version = self._settings.resize(min_size, max_size)
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.resize", min_size=min_size, max_size=max_size)
        for actor in self._registry.actors():
            actor.tell(Resize(min_size, max_size, version))

    def drain(self) -> None:
        """Replace every driver of every loop (any thread): idle ones now, the others on return.

        For credential rotation (with ``credentials=``, new drivers
        authenticate afresh), a server failover or a new certificate.
        Borrowers are not disturbed: a driver in use closes only when it
        comes back, and the pool makes new ones as it needs them.
        """
        generation = self._settings.next_generation()
        self.auth_guard.clear()  # new drivers log in afresh: let them try at once
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.drain", generation=generation)
        for actor in self._registry.actors():
            actor.tell(Drain(generation))

    # -- stats -----------------------------------------------------------------

    async def stats(self, timeout: float = 1.0, *, ask_others: bool = True) -> dict[str, PoolStats]:
        """Counters of every live loop's pool, by loop key (call inside a loop).

        A loop that does not answer within ``timeout`` seconds is reported
        with ``responsive: False`` and counters read without its actor. With
        ``ask_others=False`` only this loop's actor is asked; other running
        loops are read as they stand (``responsive: False``), so a busy loop
        never delays the answer.
        """
        here = asyncio.get_running_loop()
        answers = self._ask_stats(here, ask_own=True, ask_others=ask_others)
        if answers:
            await asyncio.wait([asyncio.wrap_future(a) for a in answers.values()], timeout=timeout)
        return {actor.key: entry for actor, entry in self._entries(answers, here)}

    def stats_sync(self, timeout: float = 1.0, *, ask_others: bool = True) -> dict[str, PoolStats]:
        """:meth:`stats` for any thread, with or without a running loop.

        With ``ask_others=False`` no actor is asked and nothing waits.
        """
        here = running_loop()
        answers = self._ask_stats(here, ask_own=False, ask_others=ask_others)
        if answers:
            concurrent.futures.wait(answers.values(), timeout=timeout)
        return {actor.key: entry for actor, entry in self._entries(answers, here)}

    def pop_stats(self, timeout: float = 1.0) -> dict[str, PoolStats]:
        """:meth:`stats_sync`, with each counter counted since the previous call (any thread).

        The counters of this view are reset, as in psycopg_pool; the counters
        of :meth:`stats`, :meth:`totals` and Prometheus keep growing. Each
        count is reported by exactly one call, whichever thread pops and
        whenever the loop runs; what loops that ended since the previous
        call counted is reported under the key ``"ended"``.
        """
        here = running_loop()
        answers = self._ask_stats(here, ask_own=False, ask_others=True)
        if answers:
            concurrent.futures.wait(answers.values(), timeout=timeout)
        entries = self._entries(answers, here)
        popped = {actor.key: actor.pool.window.take(entry) for actor, entry in entries}
        ended = self._totals.take_unpopped()
        if ended is not None:
            popped["ended"] = _ended_entry(ended)
        return popped

    def _ask_stats(
        self, here: asyncio.AbstractEventLoop | None, *, ask_own: bool, ask_others: bool
    ) -> dict[Actor, _Answer]:
        """Ask the actors that can answer now for a consistent snapshot."""
        asked: dict[Actor, _Answer] = {}
        for actor in self._registry.actors():
            mine = actor.loop is here
            if (mine and not ask_own) or (
                not mine and not (ask_others and actor.loop.is_running())
            ):
                continue  # ours while we block it, or parked, or not to be asked
            answer: _Answer = concurrent.futures.Future()
            if actor.tell(StatsRequest(functools.partial(_set_once, answer))):
                asked[actor] = answer
        return asked

    def _entries(
        self, answers: dict[Actor, _Answer], here: asyncio.AbstractEventLoop | None
    ) -> list[tuple[Actor, PoolStats]]:
        """One entry per live loop: its answer, or its counters read from here."""
        result: list[tuple[Actor, PoolStats]] = []
        for actor in self._registry.actors():
            answer = answers.get(actor)
            running = actor.loop.is_running()
            if answer is not None and answer.done() and not answer.cancelled():
                entry = answer.result()
                entry["responsive"] = True
            else:
                # Not asked (its loop is parked, or it is ours and we block it,
                # or we chose not to) or no answer in time: read the counters.
                entry = actor.snapshot_here() if actor.loop is here else actor.snapshot()
                entry["responsive"] = answer is None and (actor.loop is here or not running)
            entry["loop_running"] = running
            entry["loop_id"] = str(id(actor.loop))
            result.append((actor, entry))
        return result

    def totals(self) -> dict[str, int]:
        """Counters summed over every loop this broker ever served (they never go back)."""
        return self._totals.sums([actor.pool for actor in self._registry.entries()])

    def histograms(self) -> dict[str, Histogram]:
        """Borrow waits (``borrow_wait``) and hold times (``hold``), over every loop ever."""
        return self._totals.histograms([actor.pool for actor in self._registry.entries()])

    # -- closing ---------------------------------------------------------------

    async def aclose(self, timeout: float | None = None) -> None:
        """Close every loop's pool; wait for the ones that can answer."""
        timeout = self.config.close_timeout if timeout is None else timeout
        here = asyncio.get_running_loop()
        waits = [
            asyncio.wrap_future(done)
            for actor, done in self._shutdown_all(timeout)
            if actor.loop is here or actor.loop.is_running()
        ]
        if waits:
            await asyncio.wait(waits, timeout=timeout + 1.0)

    def close(self, timeout: float | None = None) -> None:
        """Close every loop's pool from any thread.

        Pools of running loops are waited for, up to about ``timeout``
        seconds. A pool whose loop is not running now (or is the caller's
        own) closes when its loop next runs, or when the loop ends.
        """
        timeout = self.config.close_timeout if timeout is None else timeout
        here = running_loop()
        waits = [
            done
            for actor, done in self._shutdown_all(timeout)
            if actor.loop is not here and actor.loop.is_running()
        ]
        if waits:
            concurrent.futures.wait(waits, timeout=timeout + 1.0)

    def close_soon(self, hint: str) -> None:
        """Stop taking borrows and close every pool, without waiting (any thread).

        Later borrows are told ``hint``: what to do instead.
        """
        self.closed_hint = hint
        if not self.closed:
            self._shutdown_all(self.config.close_timeout)

    def _shutdown_all(self, timeout: float) -> list[tuple[Actor, concurrent.futures.Future[None]]]:
        actors = self._registry.close()
        if log.enabled(log.INFO):
            log.emit(log.INFO, "broker.closing", loops=len(actors), timeout=timeout)
        posted: list[tuple[Actor, concurrent.futures.Future[None]]] = []
        for actor in actors:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            if actor.tell(Shutdown("broker closed", timeout, functools.partial(_set_once, done))):
                posted.append((actor, done))
        return posted

    def after_fork(self) -> None:
        """In a forked child: forget the parent's pools without touching them."""
        # The parent's loops, drivers and sockets are not ours to use or close
        # (nor to let the collector close), and its counters are not this process's.
        actors = self._registry.forget_all()
        self._last_actor = threading.local()
        inherited.keep(actors)
        inherited.detach(actor.loop for actor in actors)
        self._totals = Totals()
        self._settings.lock = threading.Lock()


def _ended_entry(counts: dict[str, int]) -> PoolStats:
    entry: dict[str, Any] = dict.fromkeys(
        ("available", "in_use", "creating", "checking", "closing", "total", "waiting"), 0
    )
    entry.update(counts, loop="ended", thread="", state="stopped", wait_max_ms=0)
    return entry  # type: ignore[return-value]


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
        broker.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
