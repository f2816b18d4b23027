"""Async Neo4j drivers for many event loops: one pool, served by one actor, per loop.

::

    import broker

    broker.configure(broker.Neo4jConnectionConfig(uri=..., username=..., password=...))

    async with broker.borrow() as conn:
        db = await conn.prepare_database("ws-1")
        await conn.driver.execute_query("RETURN 1", database_=db)
"""

from broker.broker import Broker
from broker.compat import GlobalNeo4jConnectionPool, LoopConnectionPool, Neo4jConnectionFactory
from broker.config import Neo4jConnectionConfig
from broker.connection import Connection
from broker.default import (
    aclose,
    borrow,
    close,
    configure,
    get_broker,
    release,
    stats,
    stats_sync,
    totals,
)
from broker.errors import BorrowTimeout, BrokerClosed, BrokerError
from broker.runner import run
from broker.workspace import quote_identifier

__all__ = [
    "BorrowTimeout",
    "Broker",
    "BrokerClosed",
    "BrokerError",
    "Connection",
    "GlobalNeo4jConnectionPool",
    "LoopConnectionPool",
    "Neo4jConnectionConfig",
    "Neo4jConnectionFactory",
    "aclose",
    "borrow",
    "close",
    "configure",
    "get_broker",
    "quote_identifier",
    "release",
    "run",
    "stats",
    "stats_sync",
    "totals",
]

__version__ = "0.1.0"
