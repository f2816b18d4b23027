"""Code written against the seed design runs unchanged on the broker.

Every code snippet of the seed's design note is here, in the note's order,
adapting only the connection settings: its factory of unpooled managers, its
per-loop pools and their parts, the borrowing context manager, loop ids,
stats keyed by ``str(id(loop))``, the storage pattern, the configuration,
the monitoring loop, the worker hooks and its three tests. The hooks on a
real ``celery worker`` are in ``test_seed_worker.py``; a graph storage in the
seed client's shape is in ``test_seed_client.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import neo4j
import pytest

import broker
from broker import (
    BorrowedConnection,
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    Neo4jConnectionManager,
    PooledConnectionManager,
    cleanup_worker_neo4j_config,
    cleanup_worker_neo4j_config_async,
    setup_worker_neo4j_config,
)
from broker.testing import BoltServer, EmbeddedServer, server_kind
from broker.testing.sockets import open_connections
from broker.workspace import seed_database_name
from tests.helpers import bolt_port, eventually


@pytest.fixture
def seed_config(bolt_config: Neo4jConnectionConfig) -> Iterator[Neo4jConnectionConfig]:
    """The seed's global configuration, pointed at the test server."""
    config = bolt_config.replace(pool_min_size=0)
    GlobalNeo4jConnectionPool.set_config(config)
    yield config
    broker.runner.shutdown(timeout=10)


def loop_id() -> str:
    return str(id(asyncio.get_running_loop()))


# -- phase one: a new, unpooled manager per task -----------------------------------------


async def test_phase_one_connection_manager_is_fresh_and_closed_by_its_caller(
    seed_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    port = bolt_port(bolt_server)
    before = open_connections(port)
    manager = await Neo4jConnectionFactory.get_connection_manager()
    assert isinstance(manager, Neo4jConnectionManager)
    assert manager.config == seed_config
    driver = await manager.get_driver()
    records, _, _ = await driver.execute_query("RETURN 7 AS v")
    assert records[0]["v"] == 7
    async with manager.driver_context() as same:
        assert same is driver
    database = await Neo4jConnectionManager.prepare_database(driver, "phase-one")
    assert database == seed_config.database
    other = await Neo4jConnectionFactory.get_connection_manager()
    assert other is not manager, "a new manager per call"
    # Unpooled: the pools know nothing of it.
    assert await Neo4jConnectionFactory.get_pool_stats() == {}
    assert open_connections(port) > before
    await manager.close()
    await eventually(lambda: open_connections(port) == before, what="the manager's sockets closed")
    async with Neo4jConnectionManager(seed_config) as scoped:
        await (await scoped.get_driver()).verify_connectivity()
        assert open_connections(port) > before
    await eventually(lambda: open_connections(port) == before, what="the sockets closed again")


async def test_phase_one_manager_refuses_another_loop(seed_config: Neo4jConnectionConfig) -> None:
    manager = await Neo4jConnectionFactory.get_connection_manager()
    await manager.get_driver()
    try:
        with pytest.raises(broker.BrokerError, match="another event loop"):
            await asyncio.to_thread(asyncio.run, manager.get_driver())
    finally:
        await manager.close()


# -- phase two: one pool per event loop ----------------------------------------------


async def test_get_pool_is_the_current_loops_pool_named_by_loop_id(
    seed_config: Neo4jConnectionConfig,
) -> None:
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert isinstance(pool, EventLoopConnectionPool)
    assert pool.loop_id == GlobalNeo4jConnectionPool()._get_loop_id() == loop_id()
    assert pool.config == seed_config
    conn = await pool.borrow_connection()
    assert (await pool.get_stats())["in_use"] == 1
    await pool.return_connection(conn)
    assert (await pool.get_stats())["in_use"] == 0
    assert pool.stats["max_size"] == seed_config.pool_max_size
    # Another loop's pool is another pool, and it does not serve this loop.
    other = await asyncio.to_thread(broker.run, GlobalNeo4jConnectionPool().get_pool())
    assert other.loop_id != pool.loop_id
    with pytest.raises(broker.BrokerError, match="another event loop"):
        await other.borrow_connection()


async def test_a_pools_stats_have_the_same_keys_before_its_first_borrow(
    seed_config: Neo4jConnectionConfig,
) -> None:
    pool = await GlobalNeo4jConnectionPool().get_pool()
    before, asked_before = pool.stats, await pool.get_stats()
    conn = await pool.borrow_connection()
    during, asked_during = pool.stats, await pool.get_stats()
    await pool.return_connection(conn)
    assert set(before) == set(during), set(before) ^ set(during)
    assert set(asked_before) == set(asked_during), set(asked_before) ^ set(asked_during)
    for entry in (before, asked_before):
        assert entry["loop_id"] == loop_id()
        assert entry["loop"] is None, "no pool yet, so no pool's name"
        assert entry["in_use"] == entry["available"] == entry["total"] == entry["borrows"] == 0
        assert entry["max_size"] == seed_config.pool_max_size
        assert entry["min_size"] == seed_config.pool_min_size
    for entry in (during, asked_during):
        assert entry["loop_id"] == loop_id() and entry["loop"].endswith(tuple("0123456789"))
        assert entry["in_use"] == 1 and entry["borrows"] == 1
    broker.resize(0, 3)  # a pool born later starts with the current sizes: so do the zeros
    await pool.close_all()
    assert pool.stats["max_size"] == (await pool.get_stats())["max_size"] == 3


def test_get_loop_id_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="No running event loop"):
        GlobalNeo4jConnectionPool()._get_loop_id()


async def test_borrowed_connection_borrows_on_enter_and_returns_on_exit(
    seed_config: Neo4jConnectionConfig,
) -> None:
    borrowed = BorrowedConnection(GlobalNeo4jConnectionPool())
    assert borrowed.connection is None
    async with borrowed as conn:
        assert conn is borrowed and borrowed.connection is borrowed
        driver = await conn.get_driver()
        await driver.verify_connectivity()
        assert (await Neo4jConnectionFactory.get_pool_stats())[loop_id()]["in_use"] == 1
    assert borrowed.connection is None
    assert (await Neo4jConnectionFactory.get_pool_stats())[loop_id()]["in_use"] == 0
    await borrowed.__aexit__(None, None, None)  # leaving twice is harmless


async def test_global_pool_is_one_shared_instance(seed_config: Neo4jConnectionConfig) -> None:
    pool = GlobalNeo4jConnectionPool()
    assert pool is GlobalNeo4jConnectionPool()
    assert pool is Neo4jConnectionFactory.get_global_pool()
    assert await asyncio.to_thread(GlobalNeo4jConnectionPool) is pool
    assert GlobalNeo4jConnectionPool.get_config() == seed_config


async def test_event_loop_connection_pool_borrows_and_returns(
    seed_config: Neo4jConnectionConfig,
) -> None:
    loop_pool = EventLoopConnectionPool(seed_config, loop_id())
    connection = await loop_pool.borrow_connection()
    assert isinstance(connection, PooledConnectionManager)
    assert connection.is_in_use and connection.pool is loop_pool
    driver = await connection.get_driver()
    await driver.verify_connectivity()
    stats = await loop_pool.get_stats()
    assert (stats["available"], stats["in_use"], stats["total"]) == (0, 1, 1)
    assert stats["max_size"] == seed_config.pool_max_size
    await loop_pool.return_connection(connection)
    assert not connection.is_in_use
    stats = await loop_pool.get_stats()
    assert (stats["available"], stats["in_use"], stats["total"]) == (1, 0, 1)
    # The seed's close_all: this loop's pool closes; the next borrow starts a new one.
    await loop_pool.close_all()
    assert await Neo4jConnectionFactory.get_pool_stats() == {}
    again = await loop_pool.borrow_connection()
    assert await again.get_driver() is not driver
    await again.close()
    with pytest.raises(ValueError, match="default broker's config"):
        EventLoopConnectionPool(seed_config.replace(pool_max_size=3), loop_id())


async def test_pooled_connection_manager_made_directly(seed_config: Neo4jConnectionConfig) -> None:
    pool = await GlobalNeo4jConnectionPool().get_pool()
    connection = PooledConnectionManager(seed_config, pool)
    assert not connection.is_in_use
    driver = await connection.get_driver()  # borrows on first use, as the seed made its driver
    assert connection.is_in_use
    assert await connection.get_driver() is driver
    database = await connection.prepare_database("pooled-direct")
    assert database == seed_config.database
    assert connection.config == seed_config
    await GlobalNeo4jConnectionPool().return_connection(connection)
    assert not connection.is_in_use
    assert (await pool.get_stats())["available"] == 1
    with pytest.raises(broker.BrokerError, match="released"):
        await connection.get_driver()


async def test_borrowed_connection_usage(seed_config: Neo4jConnectionConfig) -> None:
    workspace = f"seed-usage-{uuid.uuid4().hex[:8]}"
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        database = await borrowed.prepare_database(workspace)
        records, _, _ = await driver.execute_query(
            "MERGE (n:base {entity_id: $id}) RETURN n.entity_id AS id",
            id=workspace,
            database_=database,
        )
        assert records[0]["id"] == workspace


async def test_loop_id_is_the_id_of_the_running_loop(seed_config: Neo4jConnectionConfig) -> None:
    assert GlobalNeo4jConnectionPool()._get_loop_id() == f"{id(asyncio.get_running_loop())}"


async def test_pool_stats_are_keyed_by_loop_id(seed_config: Neo4jConnectionConfig) -> None:
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        await conn.get_driver()
        stats = await Neo4jConnectionFactory.get_pool_stats()
        assert stats[loop_id()]["in_use"] == 1
    stats = await Neo4jConnectionFactory.get_pool_stats()
    entry = stats[loop_id()]
    assert {"available": 1, "in_use": 0, "total": 1, "max_size": 10}.items() <= entry.items()
    assert entry["loop"].startswith(threading.current_thread().name + "/loop-")
    assert GlobalNeo4jConnectionPool().get_all_stats()[loop_id()]["available"] == 1


async def test_database_preparation_is_cached(bolt_config: Neo4jConnectionConfig) -> None:
    calls: list[str] = []

    async def preparer(driver: neo4j.AsyncDriver, workspace: str) -> str:
        calls.append(workspace)
        await driver.verify_connectivity()
        return bolt_config.database or "neo4j"

    GlobalNeo4jConnectionPool.set_config(bolt_config.replace(database_preparer=preparer))
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        first = await conn.prepare_database("cached-ws")
        assert await conn.prepare_database("cached-ws") == first
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        assert await conn.prepare_database("cached-ws") == first
    assert calls == ["cached-ws"]


# -- the storage pattern -----------------------------------------------------------


class SeedStorage:
    """initialize() and finalize() exactly as the note shows them."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self._borrowed_connection: Any = None
        self._driver: neo4j.AsyncDriver | None = None
        self._DATABASE: str | None = None

    async def initialize(self) -> None:
        # 借用连接
        self._borrowed_connection = Neo4jConnectionFactory.borrow_connection()
        await self._borrowed_connection.__aenter__()

        # 获取驱动和数据库
        self._driver = await self._borrowed_connection.get_driver()
        self._DATABASE = await self._borrowed_connection.prepare_database(self.workspace)

    async def finalize(self) -> None:
        # 归还连接到池
        if self._borrowed_connection:
            await self._borrowed_connection.__aexit__(None, None, None)
            self._borrowed_connection = None


async def test_storage_initialize_and_finalize(seed_config: Neo4jConnectionConfig) -> None:
    storage = SeedStorage(f"seed-storage-{uuid.uuid4().hex[:8]}")
    await storage.initialize()
    assert storage._driver is not None
    assert (await Neo4jConnectionFactory.get_pool_stats())[loop_id()]["in_use"] == 1
    records, _, _ = await storage._driver.execute_query(
        "MERGE (n:base {entity_id: $id}) RETURN n.entity_id AS id",
        id=storage.workspace,
        database_=storage._DATABASE,
    )
    assert records[0]["id"] == storage.workspace
    await storage.finalize()
    await storage.finalize()  # idempotent, as in the seed
    assert (await Neo4jConnectionFactory.get_pool_stats())[loop_id()]["in_use"] == 0


# -- configuration and monitoring ------------------------------------------------------


async def test_configuration_snippet(bolt_server: BoltServer) -> None:
    username, password = bolt_server.auth
    config = Neo4jConnectionConfig(
        # Neo4j 连接设置
        uri=bolt_server.uri,
        username=username,
        password=password,
        max_connection_pool_size=50,  # Neo4j 驱动内部连接池
        # 应用层连接池设置
        pool_max_size=10,  # 每个事件循环最大连接数
        pool_min_size=2,  # 每个事件循环最小连接数
    )
    GlobalNeo4jConnectionPool.set_config(config)
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        await (await conn.get_driver()).verify_connectivity()
    assert GlobalNeo4jConnectionPool.get_config() is config


async def test_monitoring_snippet_lists_every_live_loop(
    seed_config: Neo4jConnectionConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    async def borrow_once() -> str:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            await (await conn.get_driver()).verify_connectivity()
        return loop_id()

    other = await asyncio.to_thread(broker.run, borrow_once())  # a loop that stays alive
    mine = await borrow_once()

    # 获取连接池统计
    stats = await Neo4jConnectionFactory.get_pool_stats()
    print(f"活跃事件循环数: {len(stats)}")
    for loop_id_, pool_stats in stats.items():
        print(f"循环 {loop_id_}: {pool_stats}")

    assert set(stats) == {other, mine}
    printed = capsys.readouterr().out
    assert "活跃事件循环数: 2" in printed
    assert f"循环 {other}: " in printed and f"循环 {mine}: " in printed


async def test_pool_stats_do_not_wait_for_busy_loops(seed_config: Neo4jConnectionConfig) -> None:
    """Another loop blocked in a long synchronous call does not delay the stats."""
    entered, release = threading.Event(), threading.Event()

    async def borrow_then_block() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            await conn.get_driver()
        await Neo4jConnectionFactory.get_pool_stats()  # the return has been handled
        entered.set()
        release.wait(60)  # blocks this loop, as a long synchronous call would

    busy = threading.Thread(target=broker.run, args=(borrow_then_block(),), name="busy-loop")
    busy.start()
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        async with Neo4jConnectionFactory.borrow_connection():
            pass
        calls = 5
        started = time.monotonic()
        for _ in range(calls):
            stats = await Neo4jConnectionFactory.get_pool_stats()
        elapsed = time.monotonic() - started
        # Waiting for the blocked loop's answer would take its full timeout
        # (1 s) per call: at least `calls` seconds, however fast the machine.
        assert elapsed < calls * 1.0, f"{calls} calls took {elapsed:.2f} s"
        [blocked] = [v for v in stats.values() if v["thread"] == "busy-loop"]
        assert blocked["available"] == 1 and blocked["loop_running"]
        assert stats[loop_id()]["available"] == 1
        assert not release.is_set(), "the busy loop was still blocked while we read"
    finally:
        release.set()
        await asyncio.to_thread(busy.join, 30)


# -- worker lifecycle ----------------------------------------------------------------


def test_worker_lifecycle_snippets(
    bolt_server: BoltServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setup at worker start (from the environment, connecting nothing), tasks
    in their own loops, cleanup at shutdown (every pool closed)."""
    username, password = bolt_server.auth
    monkeypatch.setenv("NEO4J_URI", bolt_server.uri)
    monkeypatch.setenv("NEO4J_USERNAME", username)
    monkeypatch.setenv("NEO4J_PASSWORD", password)
    monkeypatch.setenv("NEO4J_DATABASE", bolt_server.default_database)
    port = bolt_port(bolt_server)
    before = open_connections(port)

    setup_worker_neo4j_config()
    assert GlobalNeo4jConnectionPool.get_config().uri == bolt_server.uri
    assert open_connections(port) == before, "setup connects nothing"

    # 每个 Celery 任务
    async def lightrag_task() -> str:
        # 任务开始: 从池中借用连接
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            driver = await conn.get_driver()
            # 使用连接进行操作
            records, _, _ = await driver.execute_query("RETURN 'ok' AS r")
        # 任务结束: 自动归还连接到池
        return str(records[0]["r"])

    assert [asyncio.run(lightrag_task()) for _ in range(2)] == ["ok"] * 2
    assert [broker.run(lightrag_task()) for _ in range(2)] == ["ok"] * 2
    assert open_connections(port) > before, "the broker.run loop keeps its pool"

    cleanup_worker_neo4j_config()
    assert open_connections(port) == before
    assert broker.stats_sync() == {}
    # As in the seed, later tasks get new pools.
    assert asyncio.run(lightrag_task()) == "ok"

    # The async form, as the seed's sync hook ran it.
    assert broker.run(lightrag_task()) == "ok"
    asyncio.run(cleanup_worker_neo4j_config_async())
    broker.runner.shutdown(timeout=10)
    assert open_connections(port) == before


async def test_cleanup_hook_inside_a_running_loop_schedules_the_close(
    seed_config: Neo4jConnectionConfig,
) -> None:
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        await conn.get_driver()
    assert loop_id() in await Neo4jConnectionFactory.get_pool_stats()
    old = broker.get_broker()
    cleanup_worker_neo4j_config()
    assert not old.closed, "scheduled, not run inside the caller"
    await eventually(lambda: broker.get_broker() is not old, what="the cleanup task ran")
    assert old.closed and old.totals()["closed"] == old.totals()["created"] == 1
    assert await Neo4jConnectionFactory.get_pool_stats() == {}


# -- the note's tests --------------------------------------------------------------


async def test_connection_pool(seed_config: Neo4jConnectionConfig) -> None:
    # 借用连接
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        driver = await conn.get_driver()
        # 验证连接可用
        await driver.verify_connectivity()

    # 验证连接已归还
    stats = await Neo4jConnectionFactory.get_pool_stats()
    assert stats[loop_id()]["in_use"] == 0


async def test_connection_reuse(seed_config: Neo4jConnectionConfig) -> None:
    # 第一次任务
    async with Neo4jConnectionFactory.borrow_connection() as conn1:
        driver1 = await conn1.get_driver()
        driver1_id = id(driver1)

    # 第二次任务
    async with Neo4jConnectionFactory.borrow_connection() as conn2:
        driver2 = await conn2.get_driver()
        driver2_id = id(driver2)

    # 验证连接被复用
    assert driver1_id == driver2_id


async def test_concurrent_tasks(seed_config: Neo4jConnectionConfig) -> None:
    tag = uuid.uuid4().hex[:8]

    async def process_document(doc: str) -> dict[str, str]:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            driver = await conn.get_driver()
            database = await conn.prepare_database(f"seed-docs-{tag}")
            records, _, _ = await driver.execute_query(
                "MERGE (d:base {entity_id: $id}) RETURN d.entity_id AS id",
                id=f"{tag}/{doc}",
                database_=database,
            )
            ok = records[0]["id"] == f"{tag}/{doc}"
            return {"status": "success" if ok else "wrong"}

    tasks = []
    for i in range(10):
        task = asyncio.create_task(process_document(f"doc_{i}"))
        tasks.append(task)

    # 等待所有任务完成
    results = await asyncio.gather(*tasks)

    # 验证无冲突, 所有任务成功
    assert all(result["status"] == "success" for result in results)


# -- preparation follows the seed's schema -------------------------------------------


async def test_show_indexes_after_preparation_lists_base_entity_id(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    fresh = bolt_server.create_database()
    GlobalNeo4jConnectionPool.set_config(bolt_config.replace(database=fresh, pool_min_size=0))
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        database = await conn.prepare_database("ws0")
        assert database == fresh
        records, _, _ = await conn.driver.execute_query(
            "SHOW INDEXES YIELD labelsOrTypes, properties", database_=database
        )
    indexes = [(r["labelsOrTypes"], r["properties"]) for r in records]
    assert (["base"], ["entity_id"]) in indexes
    assert (["ws0"], ["entity_id"]) not in indexes, "the seed never indexed the workspace label"


def schema_indexes(records: list[neo4j.Record]) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The label and property indexes among ``SHOW INDEXES``'s records.

    The servers differ here: Neo4j also lists its two token lookup indexes
    (one for node labels, one for relationship types), whose labels and
    properties are null; ArcadeDB has none.
    """
    lookups = [r for r in records if r["labelsOrTypes"] is None]
    if server_kind() == "neo4j":
        assert len(lookups) == 2 and all(r["properties"] is None for r in lookups), lookups
    elif server_kind() == "arcadedb":
        assert lookups == []
    return {
        (tuple(r["labelsOrTypes"]), tuple(r["properties"]))
        for r in records
        if r["labelsOrTypes"] is not None
    }


async def test_configured_indexes_and_the_workspace_label(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    fresh = bolt_server.create_database()
    indexes = (("base", "entity_id"), (None, "entity_id"), ("Doc", "source id"))
    b = broker.Broker(bolt_config.replace(database=fresh, pool_min_size=0, indexes=indexes))
    try:
        async with b.borrow() as conn:
            await conn.prepare_database("ws`1")
            records, _, _ = await conn.driver.execute_query(
                "SHOW INDEXES YIELD labelsOrTypes, properties", database_=fresh
            )
    finally:
        await b.aclose()
    found = schema_indexes(records)
    assert found == {
        (("base",), ("entity_id",)),
        (("ws`1",), ("entity_id",)),
        (("Doc",), ("source id",)),
    }


async def test_an_index_the_server_refuses_is_logged_and_preparation_goes_on(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer, caplog: pytest.LogCaptureFixture
) -> None:
    """As in the seed: a refused index (no schema rights, a label the server
    rejects) is a warning, not a failed preparation; the other indexes are made."""
    fresh = bolt_server.create_database()
    refused_label = "x" * 300  # too long a label for the embedded server
    indexes = ((refused_label, "entity_id"), ("base", "entity_id"))
    b = broker.Broker(bolt_config.replace(database=fresh, pool_min_size=0, indexes=indexes))
    try:
        with caplog.at_level("WARNING", logger="broker"):
            async with b.borrow() as conn:
                assert await conn.prepare_database("ws0") == fresh
                records, _, _ = await conn.driver.execute_query(
                    "SHOW INDEXES YIELD labelsOrTypes, properties", database_=fresh
                )
    finally:
        await b.aclose()
    found = schema_indexes(records)
    if ((refused_label,), ("entity_id",)) in found:
        pytest.skip("this server accepts the long label; nothing is refused")
    assert (("base",), ("entity_id",)) in found
    failed = [r for r in caplog.records if "workspace.index_failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]
    assert "ClientError" in failed[0].getMessage()


async def test_a_configured_database_serves_every_workspace(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    """Even when a database named for the workspace exists, as in the seed."""
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    named = bolt_server.create_database(seed_database_name(workspace))
    configured = bolt_server.create_database()
    if configured == named:
        pytest.skip("the server cannot create databases")
    b = broker.Broker(bolt_config.replace(database=configured, pool_min_size=0))
    try:
        async with b.borrow() as conn:
            assert await conn.prepare_database(workspace) == configured
            assert await conn.prepare_database("another one") == configured
    finally:
        await b.aclose()


async def test_databases_the_seed_named_are_found_again(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    tag = uuid.uuid4().hex[:8]
    workspace = f"Seed WS_{tag}"  # the seed named its database "seed-ws-<tag>"
    made = bolt_server.create_database(f"seed-ws-{tag}")
    if made != f"seed-ws-{tag}":
        pytest.skip("the server cannot create databases")
    b = broker.Broker(bolt_config.replace(database=None, pool_min_size=0))
    try:
        async with b.borrow() as conn:
            # First: ArcadeDB reports as its default whichever database the
            # connection used last.
            unknown = await conn.prepare_database(f"never made {tag}")
            assert await conn.prepare_database(workspace) == made
    finally:
        await b.aclose()
    if isinstance(bolt_server, EmbeddedServer):
        assert unknown == bolt_server.default_database, "no CREATE DATABASE here: the default"
