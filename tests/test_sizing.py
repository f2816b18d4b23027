"""The socket figures the sizing section of docs/architecture.md is worked from, measured.

A borrowed driver opens one socket for the queries a task runs one after
another, one more for each session it runs at the same time (up to
``max_connection_pool_size``), keeps them while it idles in the pool, and
closes them with the driver.
"""

from __future__ import annotations

import asyncio

import broker
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port


async def test_sockets_per_driver(
    bolt_config: broker.Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    port = bolt_port(bolt_server)
    before = open_connections(port)
    b = broker.Broker(bolt_config.replace(pool_min_size=0, pool_max_size=1))
    try:
        seen = {}
        async with b.borrow() as conn:
            seen["borrowed"] = open_connections(port) - before
            database = await conn.prepare_database("sizing")
            for _ in range(3):  # a task's queries, one after another
                await conn.driver.execute_query("RETURN 1", database_=database)
            seen["sequential"] = open_connections(port) - before

            async def query() -> None:
                await conn.driver.execute_query("RETURN 1", database_=database)

            for k in (2, 4):
                await asyncio.gather(*(query() for _ in range(k)))
                seen[f"concurrent-{k}"] = open_connections(port) - before
        seen["returned"] = open_connections(port) - before
    finally:
        await b.aclose(timeout=10)
    seen["closed"] = open_connections(port) - before
    assert seen == {
        "borrowed": 1,  # the driver verified when it was made
        "sequential": 1,
        "concurrent-2": 2,
        "concurrent-4": 4,
        "returned": 4,  # an idle driver keeps its sockets
        "closed": 0,
    }


async def test_a_driver_never_opens_more_than_its_own_pool_size(
    bolt_config: broker.Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    port = bolt_port(bolt_server)
    before = open_connections(port)
    b = broker.Broker(
        bolt_config.replace(pool_min_size=0, pool_max_size=1, max_connection_pool_size=2)
    )
    try:
        async with b.borrow() as conn:

            async def query() -> None:
                await conn.driver.execute_query("RETURN 1")

            await asyncio.gather(*(query() for _ in range(6)))
            peak = open_connections(port) - before
    finally:
        await b.aclose(timeout=10)
    assert peak == 2
