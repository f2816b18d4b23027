"""The seed design's names, on top of the broker.

Code written against the seed keeps working unchanged::

    async with Neo4jConnectionFactory.borrow_connection() as conn:
        driver = await conn.get_driver()
        database = await conn.prepare_database(workspace)

    GlobalNeo4jConnectionPool.set_config(config)
    stats = await Neo4jConnectionFactory.get_pool_stats()
    await GlobalNeo4jConnectionPool().close_all_pools()
"""

from __future__ import annotations

import asyncio
from typing import Any

from broker import default
from broker.config import Neo4jConnectionConfig
from broker.connection import Connection

__all__ = ["GlobalNeo4jConnectionPool", "LoopConnectionPool", "Neo4jConnectionFactory"]


class Neo4jConnectionFactory:
    """The seed's entry points, served by the default broker."""

    @staticmethod
    def borrow_connection() -> Connection:
        """A connection to use as ``async with`` (or ``__aenter__``/``__aexit__``)."""
        return default.borrow()

    @staticmethod
    async def get_pool_stats() -> dict[str, dict[str, Any]]:
        """Per-loop counters: ``available``, ``in_use``, ``total``, ``max_size`` and more."""
        return await default.stats()


class LoopConnectionPool:
    """The calling loop's pool, as the seed's ``EventLoopConnectionPool`` showed it."""

    def __init__(self, loop_id: str) -> None:
        self.loop_id = loop_id

    async def borrow_connection(self) -> Connection:
        """A borrowed connection; give it back with :meth:`return_connection`."""
        return await default.borrow()

    async def return_connection(self, connection: Connection) -> None:
        await default.release(connection)

    async def get_stats(self) -> dict[str, Any]:
        stats = await default.stats()
        return stats.get(self.loop_id, {})


class GlobalNeo4jConnectionPool:
    """The seed's process-wide pool manager: one pool per event loop."""

    @classmethod
    def set_config(cls, config: Neo4jConnectionConfig) -> None:
        """Use ``config`` for the default broker (replacing the current one)."""
        default.configure(config)

    async def get_pool(self) -> LoopConnectionPool:
        """The current event loop's pool."""
        actor = default.get_broker()._actor_for(asyncio.get_running_loop())
        return LoopConnectionPool(actor.key)

    async def close_all_pools(self) -> None:
        """Close every loop's pool, each in its own loop.

        As in the seed, pools are made again on the next borrow.
        """
        current = default.get_broker()
        await current.aclose()
        default.configure(current.config)
