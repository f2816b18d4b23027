"""broker.patch_neo4j(): AsyncGraphDatabase.driver(...) returns loop-safe drivers, on a real server.

``TaskStore`` is shaped like a graph library's storage class: it makes its
own driver in ``initialize()``, opens ``session(database=...)`` in each
method and closes the driver in ``finalize()``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import neo4j
import pytest

import broker
import broker.celery
from broker import patch, runner
from broker.loopsafe import LoopSafeDriver
from broker.testing import BoltServer
from tests.conftest import PLANTED_SECRETS
from tests.test_celery import celery_worker, wait_all

ORIGINAL = neo4j.AsyncGraphDatabase.__dict__["driver"]
SYNC_ORIGINAL = neo4j.GraphDatabase.__dict__["driver"]


class TaskStore:
    """Makes its driver in initialize(), closes it in finalize(): once per task."""

    def __init__(self, uri: str, auth: tuple[str, str], database: str | None = None) -> None:
        self.uri, self.auth, self.database = uri, auth, database
        self._driver: neo4j.AsyncDriver | None = None

    async def initialize(self) -> None:
        self._driver = neo4j.AsyncGraphDatabase.driver(self.uri, auth=self.auth)

    async def finalize(self) -> None:
        assert self._driver is not None
        await self._driver.close()
        self._driver = None

    async def upsert(self, key: str, value: int) -> int:
        assert self._driver is not None
        async with self._driver.session(database=self.database) as session:
            result = await session.run(
                "MERGE (n:base {entity_id: $key}) SET n.value = $value RETURN n.value AS v",
                key=key,
                value=value,
            )
            record = await result.single()
            assert record is not None
            return int(record["v"])


@pytest.fixture
def patched() -> Iterator[patch.PatchHandle]:
    handle = broker.patch_neo4j()
    try:
        yield handle
    finally:
        handle.undo()
        patch._brokers.clear()


def test_patch_is_opt_in_idempotent_and_reversible() -> None:
    assert not patch.is_patched()
    first = broker.patch_neo4j()
    second = broker.patch_neo4j()
    assert patch.is_patched()
    assert neo4j.GraphDatabase.__dict__["driver"] is SYNC_ORIGINAL, "the sync driver is untouched"
    first.undo()
    first.undo()
    assert patch.is_patched(), "on while a handle is held"
    with second:
        pass
    assert not patch.is_patched()
    assert neo4j.AsyncGraphDatabase.__dict__["driver"] is ORIGINAL


def test_settings_pick_one_broker_each_and_options_pass_through(
    bolt_config: broker.Neo4jConnectionConfig, patched: patch.PatchHandle
) -> None:
    broker.configure(bolt_config)
    auth = (bolt_config.username, bolt_config.password)
    a = neo4j.AsyncGraphDatabase.driver(bolt_config.uri, auth=auth)
    b = neo4j.AsyncGraphDatabase.driver(bolt_config.uri, auth=neo4j.basic_auth(*auth))
    assert isinstance(a, LoopSafeDriver) and isinstance(b, LoopSafeDriver)
    assert a is not b
    assert a._source() is b._source() is broker.get_broker(), "matches the default broker"
    tuned = neo4j.AsyncGraphDatabase.driver(
        bolt_config.uri, auth=auth, max_connection_pool_size=7, user_agent="store/1.0"
    )
    again = neo4j.AsyncGraphDatabase.driver(
        bolt_config.uri, auth=auth, max_connection_pool_size=7, user_agent="store/1.0"
    )
    assert isinstance(tuned, LoopSafeDriver) and isinstance(again, LoopSafeDriver)
    own = tuned._source()
    assert own is again._source() is not broker.get_broker()
    assert own.config.max_connection_pool_size == 7
    assert dict(own.config.driver_options) == {"user_agent": "store/1.0"}
    assert own.config.pool_max_size == bolt_config.pool_max_size
    other = neo4j.AsyncGraphDatabase.driver(bolt_config.uri, auth=("someone", PLANTED_SECRETS[1]))
    assert isinstance(other, LoopSafeDriver)
    assert other._source() is not own
    for shown in (repr(other), repr(other._source()), repr(other._source().config)):
        assert PLANTED_SECRETS[1] not in shown


async def test_an_auth_manager_gets_the_drivers_own_driver(
    bolt_config: broker.Neo4jConnectionConfig, patched: patch.PatchHandle
) -> None:
    from neo4j.auth_management import AsyncAuthManagers

    manager = AsyncAuthManagers.static((bolt_config.username, bolt_config.password))
    driver = neo4j.AsyncGraphDatabase.driver(bolt_config.uri, auth=manager)
    assert type(driver) is not LoopSafeDriver
    await driver.close()


def test_a_store_made_and_closed_per_task_costs_no_new_connection(
    bolt_config: broker.Neo4jConnectionConfig, patched: patch.PatchHandle
) -> None:
    broker.configure(bolt_config.replace(pool_min_size=0))
    tag = uuid.uuid4().hex[:8]

    async def one_task(n: int) -> int:
        store = TaskStore(bolt_config.uri, (bolt_config.username, bolt_config.password))
        await store.initialize()
        try:
            return await store.upsert(f"{tag}-{n}", n)
        finally:
            await store.finalize()

    values = [broker.run(one_task(n)) for n in range(20)]
    totals = broker.totals()
    runner.shutdown(10)
    assert values == list(range(20))
    assert totals["created"] == 1
    assert totals["borrows"] == 20


def test_close_pools_closes_the_brokers_made_for_other_settings(
    bolt_config: broker.Neo4jConnectionConfig, patched: patch.PatchHandle
) -> None:
    """A worker's shutdown closes them too, in loops that still run (not broker.run's)."""
    broker.configure(bolt_config.replace(pool_min_size=0))
    auth = (bolt_config.username, bolt_config.password)
    tuned = neo4j.AsyncGraphDatabase.driver(bolt_config.uri, auth=auth, user_agent="store/2.0")
    assert isinstance(tuned, LoopSafeDriver)
    own = tuned._source()
    assert own is not broker.get_broker()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        query = tuned.execute_query("RETURN 1 AS one")
        records, _, _ = asyncio.run_coroutine_threadsafe(query, loop).result(30)
        assert records[0]["one"] == 1
        assert own.totals()["created"] == 1
        broker.celery.close_pools(timeout=5)
        assert own.closed
        assert own.totals()["closed"] == 1, "its driver was closed, in its own loop"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- a real celery worker -P threads -c 4 -----------------------------------------------

PATCHED_APP = '''
"""A worker app whose task uses a store that makes its own driver, per task."""
import os

import neo4j
from celery import Celery

import broker
import broker.celery
from examples.celery_config import celery_settings

app = Celery("patched_app")
app.conf.update(celery_settings())
broker.celery.setup(app, patch_neo4j=True)


class TaskStore:
    def __init__(self):
        self.uri = os.environ["NEO4J_URI"]
        self.auth = (os.environ["NEO4J_USERNAME"], os.environ["NEO4J_PASSWORD"])
        self._driver = None

    async def initialize(self):
        self._driver = neo4j.AsyncGraphDatabase.driver(self.uri, auth=self.auth)

    async def finalize(self):
        await self._driver.close()

    async def upsert(self, key, value):
        async with self._driver.session(database=os.environ["NEO4J_DATABASE"]) as session:
            result = await session.run(
                "MERGE (n:base {entity_id: $key}) SET n.value = $value RETURN n.value AS v",
                key=key, value=value,
            )
            return (await result.single())["v"]


@broker.celery.task(app, name="patched.upsert")
async def upsert(key, value):
    store = TaskStore()
    await store.initialize()
    try:
        return await store.upsert(key, value)
    finally:
        await store.finalize()


@app.task(name="patched.totals")
def totals():
    return {"totals": broker.totals(), "loops": len(broker.stats_sync())}
'''


@pytest.mark.slow
@pytest.mark.celery
def test_threads_worker_with_the_patch_runs_a_store_per_task(
    bolt_server: BoltServer, celery_broker_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    with celery_worker(
        bolt_server,
        celery_broker_url,
        "threads",
        concurrency=4,
        app="patched_app",
        modules={"patched_app": PATCHED_APP},
    ) as live:
        sent = [live.client.send_task("patched.upsert", args=(f"{tag}-{n}", n)) for n in range(200)]
        values = wait_all(sent)
        seen = live.call("patched.totals")
        run = live.stop()
    assert values == list(range(200)), "0 errors, every value right"
    totals = seen["totals"]
    pool_max_size = 2  # NEO4J_POOL_MAX_SIZE of celery_worker()
    assert totals["borrows"] >= 200
    assert 1 <= totals["created"] <= 4 * pool_max_size
    assert seen["loops"] <= 4
    assert run.exit_code == 0
    assert run.bad_lines() == []
