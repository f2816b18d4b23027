"""Code written against the seed design runs unchanged on the broker.

The snippets below follow the seed's design note: its tests, its storage
pattern, and its worker hooks.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from broker import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
)


def _current_loop_stats(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    name = threading.current_thread().name
    return next(v for v in stats.values() if v["thread"] == name)


async def test_seed_connection_pool(bolt_config: Neo4jConnectionConfig) -> None:
    GlobalNeo4jConnectionPool.set_config(bolt_config)
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        driver = await conn.get_driver()
        await driver.verify_connectivity()

    stats = await Neo4jConnectionFactory.get_pool_stats()
    loop_stats = _current_loop_stats(stats)
    assert loop_stats["in_use"] == 0
    assert {"available", "in_use", "total", "max_size"} <= set(loop_stats)


async def test_seed_connection_reuse(bolt_config: Neo4jConnectionConfig) -> None:
    GlobalNeo4jConnectionPool.set_config(bolt_config)
    async with Neo4jConnectionFactory.borrow_connection() as conn1:
        driver1 = await conn1.get_driver()
        driver1_id = id(driver1)
    async with Neo4jConnectionFactory.borrow_connection() as conn2:
        driver2 = await conn2.get_driver()
        driver2_id = id(driver2)
    assert driver1_id == driver2_id


async def test_seed_concurrent_tasks(bolt_config: Neo4jConnectionConfig) -> None:
    GlobalNeo4jConnectionPool.set_config(bolt_config)

    async def process_document(doc: str) -> dict[str, str]:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            driver = await conn.get_driver()
            database = await conn.prepare_database("seed-docs")
            await driver.execute_query(
                "MERGE (d:`seed-docs` {entity_id: $id})", id=doc, database_=database
            )
            return {"status": "success", "doc": doc}

    tasks = []
    for i in range(10):
        task = asyncio.create_task(process_document(f"doc_{i}"))
        tasks.append(task)
    results = await asyncio.gather(*tasks)
    assert all(result["status"] == "success" for result in results)


class Neo4jStorage:
    """The seed's storage pattern: borrow in initialize(), return in finalize()."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self._borrowed_connection: Any = None
        self._driver: Any = None
        self._DATABASE: str | None = None

    async def initialize(self) -> None:
        self._borrowed_connection = Neo4jConnectionFactory.borrow_connection()
        await self._borrowed_connection.__aenter__()
        self._driver = await self._borrowed_connection.get_driver()
        self._DATABASE = await self._borrowed_connection.prepare_database(self.workspace)

    async def upsert(self, entity_id: str) -> None:
        await self._driver.execute_query(
            "MERGE (n:`seed-storage` {entity_id: $id})", id=entity_id, database_=self._DATABASE
        )

    async def count(self) -> int:
        records, _, _ = await self._driver.execute_query(
            "MATCH (n:`seed-storage`) RETURN count(n) AS c", database_=self._DATABASE
        )
        return int(records[0]["c"])

    async def finalize(self) -> None:
        if self._borrowed_connection:
            await self._borrowed_connection.__aexit__(None, None, None)
            self._borrowed_connection = None


async def test_seed_storage_pattern(bolt_config: Neo4jConnectionConfig) -> None:
    GlobalNeo4jConnectionPool.set_config(bolt_config)
    storage = Neo4jStorage("seed-storage")
    await storage.initialize()
    assert _current_loop_stats(await Neo4jConnectionFactory.get_pool_stats())["in_use"] == 1
    await storage.upsert("a")
    await storage.upsert("b")
    assert await storage.count() >= 2
    await storage.finalize()
    await storage.finalize()  # idempotent, as in the seed
    assert _current_loop_stats(await Neo4jConnectionFactory.get_pool_stats())["in_use"] == 0


async def test_seed_global_pool_and_close_all_pools(bolt_config: Neo4jConnectionConfig) -> None:
    GlobalNeo4jConnectionPool.set_config(bolt_config)
    pool = await GlobalNeo4jConnectionPool().get_pool()
    conn = await pool.borrow_connection()
    driver = await conn.get_driver()
    await driver.verify_connectivity()
    assert (await pool.get_stats())["in_use"] == 1
    await pool.return_connection(conn)
    assert (await pool.get_stats())["in_use"] == 0

    await GlobalNeo4jConnectionPool().close_all_pools()
    # As in the seed, the next borrow builds a new pool.
    async with Neo4jConnectionFactory.borrow_connection() as again:
        assert await again.get_driver() is not driver


def test_seed_worker_hooks(bolt_config: Neo4jConnectionConfig) -> None:
    """setup at worker start (no connection), tasks in asyncio.run, cleanup at shutdown."""

    def setup_worker_neo4j_config(**kwargs: Any) -> None:
        GlobalNeo4jConnectionPool.set_config(bolt_config)

    async def lightrag_task() -> str:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            driver = await conn.get_driver()
            records, _, _ = await driver.execute_query("RETURN 'ok' AS r")
            return str(records[0]["r"])

    async def cleanup_worker_neo4j_config_async(**kwargs: Any) -> None:
        pool = GlobalNeo4jConnectionPool()
        await pool.close_all_pools()

    setup_worker_neo4j_config()
    assert [asyncio.run(lightrag_task()) for _ in range(3)] == ["ok"] * 3
    asyncio.run(cleanup_worker_neo4j_config_async())
