"""Async Neo4j drivers for many event loops: one pool, served by one actor, per loop.

::

    import broker

    broker.configure(broker.Neo4jConnectionConfig(uri=..., username=..., password=...))

    async with broker.borrow() as conn:
        db = await conn.prepare_database("ws-1")
        await conn.driver.execute_query("RETURN 1", database_=db)
"""

from broker.broker import Broker
from broker.compat import (
    BorrowedConnection,
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    LoopConnectionPool,
    Neo4jConnectionFactory,
    Neo4jConnectionManager,
    PooledConnectionManager,
    cleanup_worker_neo4j_config,
    cleanup_worker_neo4j_config_async,
    setup_worker_neo4j_config,
)
from broker.config import Neo4jConnectionConfig
from broker.connection import Connection
from broker.default import (
    aclose,
    borrow,
    check,
    close,
    configure,
    drain,
    driver,
    get_broker,
    pop_stats,
    release,
    resize,
    stats,
    stats_sync,
    totals,
    wait,
)
from broker.errors import (
    AuthBackoff,
    BorrowTimeout,
    BrokerAuthError,
    BrokerClosed,
    BrokerError,
    TooManyWaiters,
    UserLocked,
)
from broker.patch import patch_neo4j
from broker.runner import run
from broker.workspace import quote_identifier

__all__ = [
    "AuthBackoff",
    "BorrowTimeout",
    "BorrowedConnection",
    "Broker",
    "BrokerAuthError",
    "BrokerClosed",
    "BrokerError",
    "Connection",
    "EventLoopConnectionPool",
    "GlobalNeo4jConnectionPool",
    "LoopConnectionPool",
    "Neo4jConnectionConfig",
    "Neo4jConnectionFactory",
    "Neo4jConnectionManager",
    "PooledConnectionManager",
    "TooManyWaiters",
    "UserLocked",
    "aclose",
    "borrow",
    "check",
    "cleanup_worker_neo4j_config",
    "cleanup_worker_neo4j_config_async",
    "close",
    "configure",
    "drain",
    "driver",
    "get_broker",
    "patch_neo4j",
    "pop_stats",
    "quote_identifier",
    "release",
    "resize",
    "run",
    "setup_worker_neo4j_config",
    "stats",
    "stats_sync",
    "totals",
    "wait",
]

__version__ = "0.1.0"
