"""broker.driver(): one stand-in for neo4j.AsyncDriver, used from many loops at once.

Every test runs against the real embedded Bolt server. ``GraphStore`` is
shaped like the storage classes of graph libraries: it keeps a driver in an
attribute and opens ``session(database=...)`` in each method.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
from typing import Any

import neo4j
import pytest
from neo4j.exceptions import DriverError

import broker
from broker import runner
from broker.loopsafe import LoopSafeDriver


class GraphStore:
    """A storage class as graph libraries write them: a driver held in an attribute."""

    def __init__(self, driver: neo4j.AsyncDriver, database: str | None = None) -> None:
        self._driver = driver
        self._database = database

    async def upsert(self, key: str, value: int) -> None:
        async with self._driver.session(database=self._database) as session:

            async def write(tx: neo4j.AsyncManagedTransaction) -> None:
                result = await tx.run(
                    "MERGE (n:base {entity_id: $key}) SET n.value = $value", key=key, value=value
                )
                await result.consume()

            await session.execute_write(write)

    async def get(self, key: str) -> int | None:
        async with self._driver.session(database=self._database) as session:
            result = await session.run(
                "MATCH (n:base {entity_id: $key}) RETURN n.value AS value", key=key
            )
            record = await result.single()
            return None if record is None else int(record["value"])


async def in_use(b: broker.Broker) -> int:
    await asyncio.sleep(0)  # a driver with no session left goes back at the loop's next turn
    return sum(entry["in_use"] for entry in (await b.stats()).values())


#: Made once, at import time, with no loop and no configured broker.
STORE = GraphStore(broker.driver())


def test_it_stands_for_an_async_driver() -> None:
    driver = broker.driver()
    assert isinstance(driver, neo4j.AsyncDriver)
    assert isinstance(driver.session(), neo4j.AsyncSession)
    assert "password" not in repr(driver)


async def test_the_public_methods_work_as_documented(make_broker: Any) -> None:
    b = make_broker()
    driver = b.driver()
    await driver.verify_connectivity()
    info = await driver.get_server_info()
    assert info.address is not None
    assert isinstance(await driver.supports_multi_db(), bool)
    assert isinstance(await driver.supports_session_auth(), bool)
    assert driver.encrypted is False
    key = f"k-{uuid.uuid4().hex[:8]}"
    records, _, _ = await driver.execute_query(
        "MERGE (n:base {entity_id: $key}) SET n.value = 7 RETURN n.value AS v", key=key
    )
    assert records[0]["v"] == 7
    assert await driver.execute_query_bookmark_manager.get_bookmarks() is not None
    async with driver.session() as session:
        tx = await session.begin_transaction()
        result = await tx.run("MATCH (n:base {entity_id: $key}) RETURN n.value AS v", key=key)
        assert (await result.single())["v"] == 7  # type: ignore[index]
        await tx.commit()
        assert await session.last_bookmarks() is not None
    assert await in_use(b) == 0, "every share went back"


async def test_close_ends_the_stand_in_only(make_broker: Any) -> None:
    b = make_broker()
    first, second = b.driver(), b.driver()
    async with first as entered:
        assert entered is first
        await first.execute_query("RETURN 1")
    with pytest.raises(DriverError):
        first.session()
    with pytest.raises(DriverError):
        await first.execute_query("RETURN 1")
    with pytest.raises(DriverError):
        await first.verify_connectivity()
    records, _, _ = await second.execute_query("RETURN 1 AS one")
    assert records[0]["one"] == 1
    assert not b.closed
    assert b.totals()["created"] >= 1 and b.totals()["closed"] == 0, "the pool stayed"


async def test_concurrent_sessions_share_a_pooled_driver(make_broker: Any) -> None:
    b = make_broker(pool_min_size=0, sessions_per_driver=16)
    driver = b.driver()
    store = GraphStore(driver)
    tag = uuid.uuid4().hex[:8]
    await asyncio.gather(*(store.upsert(f"{tag}-{n}", n) for n in range(32)))
    values = await asyncio.gather(*(store.get(f"{tag}-{n}") for n in range(32)))
    assert values == list(range(32))
    totals = b.totals()
    assert totals["created"] == 2, "32 sessions at once, 16 per driver"
    assert await in_use(b) == 0
    async with b.borrow() as conn:  # borrow() stays exclusive
        (entry,) = (await b.stats()).values()
        assert entry["in_use"] == 1
        assert conn.driver is not None


async def test_a_connection_error_has_the_driver_checked(make_broker: Any) -> None:
    b = make_broker(pool_min_size=0)
    driver = b.driver()

    async def read_on_a_dropped_connection() -> None:
        async with driver.session() as session:
            await session.run("RETURN 1")
            # As reading a result on a connection that dropped raises it.
            raise neo4j.exceptions.ServiceUnavailable("cut")

    with pytest.raises(neo4j.exceptions.ServiceUnavailable):
        await read_on_a_dropped_connection()
    await asyncio.sleep(0)
    (entry,) = (await b.stats()).values()
    assert entry["returns_bad"] == 1


async def test_a_session_dropped_mid_result_is_closed_in_its_loop(
    make_broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its real session is closed, so the pooled driver's one connection is free again."""
    b = make_broker(
        pool_min_size=0,
        pool_max_size=1,
        max_connection_pool_size=1,
        connection_acquisition_timeout=2.0,
    )
    driver = b.driver()
    session = driver.session()
    result = await session.run("UNWIND range(1, 20000) AS n RETURN n")
    assert len(await result.fetch(1)) == 1  # the rest is still on its way
    del session, result
    gc.collect()
    for _ in range(100):
        if await in_use(b) == 0:
            break
        await asyncio.sleep(0.02)
    assert await in_use(b) == 0
    # The same pooled driver (the pool holds one), with its only connection.
    records, _, _ = await driver.execute_query("RETURN 1 AS one")
    assert records[0]["one"] == 1
    assert b.totals()["created"] == 1
    assert "session.dropped_unclosed" in caplog.text, "the owner's bug is named"


# -- many loops at once ---------------------------------------------------------------


def test_one_store_made_at_import_serves_eight_threads_of_loops(
    bolt_config: broker.Neo4jConnectionConfig,
) -> None:
    """4 threads of asyncio.run and 4 of broker.run, 50 tasks each, on one import-time store."""
    broker.configure(bolt_config.replace(pool_max_size=2, pool_min_size=0))
    tag = uuid.uuid4().hex[:8]
    errors: list[str] = []
    wrong: list[tuple[str, Any]] = []

    async def task(thread: int, n: int) -> None:
        key = f"{tag}-{thread}-{n}"
        a, b = f"{key}-a", f"{key}-b"
        await asyncio.gather(STORE.upsert(a, n), STORE.upsert(b, n + 1))
        got = await asyncio.gather(STORE.get(a), STORE.get(b))
        if got != [n, n + 1]:
            wrong.append((key, got))

    def worker(thread: int, run: Any) -> None:
        for n in range(50):
            try:
                run(task(thread, n))
            except Exception as exc:  # recorded, asserted below
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=worker, args=(k, asyncio.run if k < 4 else broker.run))
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    persistent = broker.stats_sync()
    totals = broker.totals()
    runner.shutdown(10)
    assert errors == []
    assert wrong == []
    # One driver per loop (two sessions at once share it), never beyond pool_max_size.
    assert len(persistent) == 4
    for entry in persistent.values():
        assert entry["created"] <= 2
    assert totals["created"] <= 4 * 50 * 2 + 4 * 2
    assert sum(entry["in_use"] for entry in persistent.values()) == 0


def test_loop_safe_driver_type() -> None:
    assert isinstance(STORE._driver, LoopSafeDriver)
