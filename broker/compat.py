"""The seed design's names, as thin layers over the default broker.

Code written against the seed keeps working unchanged::

    conn = Neo4jConnectionFactory.borrow_connection()
    await conn.__aenter__()                      # or: async with ... as conn
    driver = await conn.get_driver()
    database = await conn.prepare_database(workspace)
    ...
    await conn.__aexit__(None, None, None)

    GlobalNeo4jConnectionPool.set_config(Neo4jConnectionConfig())  # NEO4J_* variables
    stats = await Neo4jConnectionFactory.get_pool_stats()           # by str(id(loop))

Every name here serves the default broker (``broker.borrow()``); none keeps a
pool of its own. One thing differs on purpose: pools are kept by the loop
object, never by ``id(loop)``. An id is reused once its loop is gone, so a
pool found by id can be handed to a new loop whose drivers it never made. The
id only names a live loop's entry in the stats, as the seed's stats did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, ClassVar, Self

from neo4j import AsyncDriver

from broker import default, log
from broker.asyncio_internals import running_loop
from broker.background import detach
from broker.broker import Broker
from broker.config import Neo4jConnectionConfig
from broker.connection import Connection
from broker.errors import BrokerError
from broker.stats import PoolStats
from broker.workspace import check_workspace

__all__ = [
    "BorrowedConnection",
    "EventLoopConnectionPool",
    "GlobalNeo4jConnectionPool",
    "LoopConnectionPool",
    "Neo4jConnectionFactory",
    "Neo4jConnectionManager",
    "PooledConnectionManager",
    "cleanup_worker_neo4j_config",
    "cleanup_worker_neo4j_config_async",
    "setup_worker_neo4j_config",
]


def _loop_id(loop: asyncio.AbstractEventLoop) -> str:
    return str(id(loop))


def _by_loop_id(stats: Mapping[str, PoolStats]) -> dict[str, PoolStats]:
    """Stats entries keyed by ``str(id(loop))``; each keeps its readable ``loop`` key."""
    return {str(entry["loop_id"]): entry for entry in stats.values()}


def _check_config(given: Neo4jConnectionConfig | None, used: Neo4jConnectionConfig) -> None:
    if given is not None and given != used:
        raise ValueError(
            "pools here use the default broker's config; "
            "change it with GlobalNeo4jConnectionPool.set_config(config)"
        )


def _check_connection(connection: object) -> Connection:
    if not isinstance(connection, Connection):
        raise BrokerError(f"expected a borrowed connection, got {type(connection).__name__}")
    return connection


class PooledConnectionManager(Connection):
    """A driver of one loop's pool, as the seed's pools handed them out.

    It is a :class:`~broker.Connection` of the default broker. A pool's
    ``borrow_connection()`` returns one already borrowed; one made directly,
    ``PooledConnectionManager(config, pool)``, borrows from the current
    loop's pool on its first ``get_driver()`` or ``prepare_database()``, as
    the seed's made its driver on first use. The pool owns the driver:
    :meth:`close` gives it back instead of closing it. ``config``, if given,
    must be the default broker's.
    """

    __slots__ = ("_config", "pool")

    def __init__(
        self,
        config: Neo4jConnectionConfig | None = None,
        pool: EventLoopConnectionPool | None = None,
        timeout: float | None = None,
    ) -> None:
        current = default.get_broker()
        _check_config(config, current.config)
        super().__init__(current, timeout)
        self._config = current.config
        self.pool = pool

    @property
    def config(self) -> Neo4jConnectionConfig:
        return self._config

    @property
    def is_in_use(self) -> bool:
        """True while the driver is borrowed."""
        return self.borrowed

    async def get_driver(self) -> AsyncDriver:
        await self._borrow_on_first_use()
        return self.driver

    async def prepare_database(self, workspace: str) -> str:
        await self._borrow_on_first_use()
        return await super().prepare_database(workspace)

    async def _borrow_on_first_use(self) -> None:
        if self.borrowed or self.released:
            return  # borrowed, or given back (then ``driver`` says so)
        if self.pool is None:
            self.pool = EventLoopConnectionPool()
        self.pool.check_loop()
        await self

    async def close(self) -> None:
        """Give the driver back to its pool."""
        await self.release()


class EventLoopConnectionPool:
    """One event loop's pool, as the seed showed it: the default broker's pool of that loop.

    Made inside its loop (``await GlobalNeo4jConnectionPool().get_pool()``).
    ``config`` is accepted for the seed's signature and must be the default
    broker's; set another with :meth:`GlobalNeo4jConnectionPool.set_config`.
    """

    def __init__(
        self, config: Neo4jConnectionConfig | None = None, loop_id: str | None = None
    ) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BrokerError(
                "an EventLoopConnectionPool belongs to a running event loop: "
                "use 'await GlobalNeo4jConnectionPool().get_pool()' inside it"
            ) from None
        _check_config(config, default.get_broker().config)
        self._loop = weakref.ref(loop)
        self.loop_id = _loop_id(loop) if loop_id is None else loop_id

    @property
    def config(self) -> Neo4jConnectionConfig:
        return default.get_broker().config

    def check_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which must be this pool's."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop():
            raise BrokerError(
                "this pool belongs to another event loop; "
                "use 'await GlobalNeo4jConnectionPool().get_pool()' in this one"
            )
        return loop

    async def borrow_connection(self) -> PooledConnectionManager:
        """A driver of this loop's pool; give it back with :meth:`return_connection`."""
        self.check_loop()
        return await PooledConnectionManager(pool=self)

    async def return_connection(self, connection: Connection) -> None:
        await _check_connection(connection).release()

    async def close_all(self) -> None:
        """Close this loop's pool; the next borrow in this loop starts a new one."""
        self.check_loop()
        await default.get_broker().close_here()

    @property
    def stats(self) -> PoolStats:
        """This loop's counters as they stand (``available``, ``in_use``, ``total`` ...).

        Before the loop's first borrow the keys are the same, with zeros,
        the current sizes and ``loop`` None (the pool gets its name when it
        starts); ``loop_id`` names the loop either way.
        """
        entry = default.get_broker().pool_stats(self._loop())
        entry["loop_id"] = self.loop_id
        return entry

    async def get_stats(self) -> PoolStats:
        """This loop's counters once its pool has handled what was sent to it so far.

        Before the loop's first borrow: the keys of :meth:`Broker.stats`
        entries, with zeros, as :attr:`stats` gives them.
        """
        loop = self.check_loop()
        current = default.get_broker()
        entry = _by_loop_id(await current.stats(ask_others=False)).get(_loop_id(loop))
        if entry is None:
            entry = current.pool_stats(None)
            entry["responsive"] = entry["loop_running"] = True
            entry["loop_id"] = _loop_id(loop)
        return entry


#: The name this module gave :class:`EventLoopConnectionPool` before.
LoopConnectionPool = EventLoopConnectionPool


class GlobalNeo4jConnectionPool:
    """The seed's process-wide pool manager: one pool per event loop, the default broker's.

    ``GlobalNeo4jConnectionPool()`` always returns the same instance.
    """

    _instance: ClassVar[Any] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __new__(cls) -> Self:
        instance = cls._instance
        if instance is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = super().__new__(cls)
                instance = cls._instance
        assert isinstance(instance, cls)
        return instance

    @classmethod
    def set_config(cls, config: Neo4jConnectionConfig) -> None:
        """Use ``config`` for the default broker from now on.

        The previous default's pools close in their own loops once their
        drivers come back; every later borrow uses ``config``.
        """
        default.configure(config)

    @classmethod
    def get_config(cls) -> Neo4jConnectionConfig:
        """The default broker's config (read from ``NEO4J_*`` if none was set)."""
        return default.get_broker().config

    def _get_loop_id(self) -> str:
        """``str(id(loop))`` of the running loop: how the seed named a loop's pool."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("No running event loop found") from None
        return _loop_id(loop)

    async def get_pool(self) -> EventLoopConnectionPool:
        """The current event loop's pool."""
        return EventLoopConnectionPool(loop_id=self._get_loop_id())

    async def borrow_connection(self) -> PooledConnectionManager:
        """A driver of the current loop's pool; give it back with :meth:`return_connection`."""
        pool = await self.get_pool()
        return await pool.borrow_connection()

    async def return_connection(self, connection: Connection) -> None:
        await _check_connection(connection).release()

    async def close_all_pools(self) -> None:
        """Close every loop's pool, each in its own loop.

        Pools of loops running now are waited for; a loop that is not
        running closes its pool when it runs again or ends. As in the seed,
        the next borrow makes a new pool, with the same config.
        """
        current = default.get_broker()
        await current.aclose()
        _reopen(current)

    def get_all_stats(self) -> dict[str, PoolStats]:
        """Every live loop's counters as they stand, by ``str(id(loop))``; never waits."""
        return _by_loop_id(default.get_broker().stats_sync(ask_others=False))


class BorrowedConnection(Connection):
    """The seed's borrowing context manager: ``async with``, or ``__aenter__``/``__aexit__``.

    It is itself the borrowed :class:`~broker.Connection` of the default
    broker, so ``get_driver()``, ``prepare_database()`` and ``driver`` work
    while it is held, and leaving it twice is harmless.
    """

    __slots__ = ("pool_manager",)

    def __init__(
        self, pool_manager: GlobalNeo4jConnectionPool | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(default.get_broker(), timeout)
        self.pool_manager = GlobalNeo4jConnectionPool() if pool_manager is None else pool_manager

    @property
    def connection(self) -> BorrowedConnection | None:
        """The borrowed connection while it is held (itself), else None."""
        return self if self.borrowed else None


class Neo4jConnectionManager:
    """The seed's first design: one unpooled driver of its own; the caller closes it.

    The driver is made with the default broker's config (or ``config``) in
    the loop that first asks for it, and is refused to other loops. Prefer
    :meth:`Neo4jConnectionFactory.borrow_connection`, which reuses drivers.
    """

    def __init__(self, config: Neo4jConnectionConfig | None = None) -> None:
        self.config = GlobalNeo4jConnectionPool.get_config() if config is None else config
        self._driver: AsyncDriver | None = None
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    async def get_driver(self) -> AsyncDriver:
        """The manager's driver, made and verified on first use."""
        loop = asyncio.get_running_loop()
        if self._driver is None:
            driver = default.get_broker().driver_factory(self.config)
            try:
                await driver.verify_connectivity()
            except BaseException:
                await driver.close()
                raise
            if self._driver is None:
                self._driver, self._loop = driver, weakref.ref(loop)
            else:  # another task of this loop made one meanwhile
                await driver.close()
        if self._loop is not None and self._loop() is not loop:
            raise BrokerError(
                "this manager's driver belongs to another event loop; "
                "get a manager per loop from Neo4jConnectionFactory.get_connection_manager()"
            )
        return self._driver

    @contextlib.asynccontextmanager
    async def driver_context(self) -> AsyncIterator[AsyncDriver]:
        """The driver, for ``async with``; it stays open until :meth:`close`."""
        yield await self.get_driver()

    async def close(self) -> None:
        """Close the driver; a later :meth:`get_driver` makes a new one."""
        driver, self._driver, self._loop = self._driver, None, None
        if driver is not None:
            await driver.close()

    async def __aenter__(self) -> Self:
        await self.get_driver()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    async def prepare_database(driver: AsyncDriver, workspace: str) -> str:
        """Prepare ``workspace`` with ``driver`` as the default broker does; return its database."""
        check_workspace(workspace)
        return await default.get_broker().workspaces.preparer(driver, workspace)


class Neo4jConnectionFactory:
    """The seed's entry points, served by the default broker."""

    @classmethod
    def get_global_pool(cls) -> GlobalNeo4jConnectionPool:
        return GlobalNeo4jConnectionPool()

    @classmethod
    def borrow_connection(cls) -> BorrowedConnection:
        """A connection to use as ``async with`` (or ``__aenter__``/``__aexit__``)."""
        return BorrowedConnection(cls.get_global_pool())

    @classmethod
    async def get_pool_stats(cls) -> dict[str, PoolStats]:
        """Every live loop's counters by ``str(id(loop))``: ``available``, ``in_use``,
        ``total``, ``max_size`` and more, with the readable key as ``loop``.

        This loop's entry counts everything sent to its pool so far; other
        loops are read as they stand, so a busy loop never delays the answer.
        """
        return _by_loop_id(await default.get_broker().stats(ask_others=False))

    @classmethod
    async def get_connection_manager(cls) -> Neo4jConnectionManager:
        """A fresh, unpooled manager for the current loop; the caller closes it."""
        return Neo4jConnectionManager(GlobalNeo4jConnectionPool.get_config())


# -- worker hooks (Celery's worker_process_init / worker_process_shutdown) ------------


def setup_worker_neo4j_config(**kwargs: Any) -> None:
    """Worker start: the default broker, configured from ``NEO4J_*``. Connects nothing."""
    GlobalNeo4jConnectionPool.set_config(Neo4jConnectionConfig())


async def cleanup_worker_neo4j_config_async(**kwargs: Any) -> None:
    """Close every loop's pool, each in its own loop (see ``close_all_pools``)."""
    await GlobalNeo4jConnectionPool().close_all_pools()


def cleanup_worker_neo4j_config(**kwargs: Any) -> None:
    """Worker shutdown: close every pool of the process, each in its own loop.

    From a thread without a running loop (a signal handler), the loops made
    by :func:`broker.run` end after their pools closed their drivers, then
    the default broker's other pools are closed and waited for, as
    ``broker.celery.close_pools()`` does. Inside a running loop the closing
    is scheduled there, as in the seed. Later borrows make new pools.
    """
    loop = running_loop()
    if loop is not None:
        detach(cleanup_worker_neo4j_config_async(**kwargs))
        return
    current = default.close_process_pools()
    totals = current.totals() if current is not None else {}
    if current is not None:
        _reopen(current)
    log.emit(log.INFO, "compat.pools_closed", pid=os.getpid(), **totals)


def _reopen(closed: Broker) -> None:
    """A fresh default broker like ``closed``, unless another was configured meanwhile."""
    if default.current() is closed:
        default.configure(closed.config, driver_factory=closed.driver_factory)
