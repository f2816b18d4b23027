"""What only a real Neo4j shows, checked on Neo4j Community through the broker.

- Community has one user database: ``CREATE DATABASE`` is refused, so
  ``prepare_database`` hands out ``neo4j`` and ``SHOW INDEXES`` lists the
  ``:base(entity_id)`` index it made there;
- ``neo4j://``: the driver asks the server for its routing table;
- concurrent ``MERGE`` in managed transactions from several loops: Neo4j's
  lock manager answers a deadlock with a transient error, and the driver's
  retries, running on a borrowed driver, still land every write exactly once;
- kill -9 under a write load, and a restart over the same data: every write
  that was acknowledged is still there, and the broker recovers;
- TLS through :class:`~broker.testing.tls.TlsFront`.

Skipped unless the suite runs against Neo4j (``make test-neo4j``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import neo4j
import neo4j.exceptions
import pytest

from broker import Broker, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.tls import TlsFront
from tests.helpers import as_neo4j, neo4j_only

pytestmark = neo4j_only


def _on_threads(work: Callable[..., None], calls: list[tuple[Any, ...]], timeout: float) -> None:
    """Run ``work(*args)`` on a thread of its own for each ``args``; wait for all."""
    threads = [threading.Thread(target=work, args=args) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _count(server: BoltServer, query: str, **params: Any) -> int:
    with neo4j.GraphDatabase.driver(server.uri, auth=server.auth) as driver:
        records, _, _ = driver.execute_query(query, params)
    return int(records[0][0])


async def test_community_has_one_database_and_prepare_indexes_it(
    bolt_server: BoltServer, make_broker: Any
) -> None:
    server = as_neo4j(bolt_server)
    with neo4j.GraphDatabase.driver(server.uri, auth=server.auth) as driver:
        records, _, _ = driver.execute_query("SHOW DATABASES YIELD name", database_="system")
        assert sorted(r["name"] for r in records) == ["neo4j", "system"]
        with pytest.raises(neo4j.exceptions.ClientError) as refused:
            driver.execute_query("CREATE DATABASE other", database_="system")
        assert refused.value.code == "Neo.ClientError.Statement.UnsupportedAdministrationCommand"
        driver.execute_query("CREATE (:Leftover)")
    # The fixtures' "fresh database" is the one database, emptied.
    assert server.create_database("anything") == "neo4j"
    assert _count(server, "MATCH (n) RETURN count(n)") == 0
    index_query = (
        "SHOW INDEXES YIELD labelsOrTypes, properties "
        "WHERE labelsOrTypes = ['base'] AND properties = ['entity_id'] RETURN count(*)"
    )
    assert _count(server, index_query) == 0

    b = make_broker()
    async with b.borrow() as conn:
        database = await conn.prepare_database("ws-community")
        assert database == "neo4j", "Community cannot create one: the default is used"
        await conn.driver.execute_query(
            "MERGE (:base {entity_id: $id})", id="e1", database_=database
        )
    assert _count(server, index_query) == 1


def _routed_query(b: Broker, results: list[tuple[str, int]]) -> None:
    async def run() -> None:
        async with b.borrow() as conn:
            for mode in (neo4j.RoutingControl.WRITE, neo4j.RoutingControl.READ):
                records, summary, _ = await conn.driver.execute_query(
                    "RETURN 6 * 7 AS x", routing_=mode
                )
                address = summary.server.address
                results.append((f"{address.host}:{address.port}", records[0]["x"]))

    asyncio.run(run())


async def test_neo4j_scheme_routes_through_the_broker(
    bolt_server: BoltServer, bolt_config: Neo4jConnectionConfig
) -> None:
    server = as_neo4j(bolt_server)
    b = Broker(bolt_config.replace(uri=server.routing_uri, pool_min_size=0))
    results: list[tuple[str, int]] = []
    try:
        _on_threads(_routed_query, [(b, results)] * 3, timeout=60)
    finally:
        await b.aclose(timeout=5)
    # Each answer came from the address in the server's routing table.
    assert results == [(f"127.0.0.1:{server.bolt_port}", 42)] * 6


# -- concurrent MERGE: transient errors, retried by the driver -----------------------------

_MERGE = "MERGE (s:Slot {key: $key}) SET s.n = s.n + 1"
_RECORD = "CREATE (:Write {id: $id})"


class Writes:
    """Counts each transaction function's attempts, per task and in all."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.committed: list[str] = []
        self.lock = threading.Lock()

    def attempt(self, task: str) -> int:
        with self.lock:
            self.attempts[task] = self.attempts.get(task, 0) + 1
            return self.attempts[task]


async def _write_pair(
    b: Broker,
    writes: Writes,
    task: str,
    keys: tuple[str, str],
    meet: threading.Barrier | None = None,
) -> None:
    async def work(tx: neo4j.AsyncManagedTransaction) -> None:
        attempt = writes.attempt(task)
        await (await tx.run(_MERGE, key=keys[0])).consume()
        if meet is not None and attempt == 1:
            # Both transactions hold their first lock before either asks for its second.
            await asyncio.to_thread(meet.wait, 30)
        await (await tx.run(_MERGE, key=keys[1])).consume()
        await (await tx.run(_RECORD, id=task)).consume()

    async with b.borrow() as conn, conn.driver.session() as session:
        await session.execute_write(work)
    with writes.lock:
        writes.committed.append(task)


def _in_own_loop(b: Broker, writes: Writes, jobs: list[tuple[str, tuple[str, str]]]) -> None:
    async def run() -> None:
        await asyncio.gather(*(_write_pair(b, writes, task, keys) for task, keys in jobs))

    asyncio.run(run())


def _hot_slots(server: BoltServer, keys: str) -> None:
    """Nodes many transactions write to, behind a uniqueness constraint.

    Without the constraint, concurrent ``MERGE`` of a node that does not
    exist yet creates it twice: uncommitted nodes are invisible to others.
    """
    with neo4j.GraphDatabase.driver(server.uri, auth=server.auth) as driver:
        driver.execute_query(
            "CREATE CONSTRAINT slot_key IF NOT EXISTS FOR (s:Slot) REQUIRE s.key IS UNIQUE"
        )
        driver.execute_query("UNWIND $keys AS key CREATE (:Slot {key: key, n: 0})", keys=list(keys))


def _landed(server: BoltServer) -> tuple[list[str], dict[str, int]]:
    with neo4j.GraphDatabase.driver(server.uri, auth=server.auth) as driver:
        ids, _, _ = driver.execute_query("MATCH (w:Write) RETURN w.id AS id")
        slots, _, _ = driver.execute_query("MATCH (s:Slot) RETURN s.key AS key, s.n AS n")
    counts = {r["key"]: r["n"] for r in slots}
    assert len(counts) == len(slots), f"a slot was created twice: {slots}"
    return sorted(r["id"] for r in ids), counts


async def test_deadlock_is_retried_by_the_driver_through_the_broker(
    bolt_server: BoltServer, bolt_config: Neo4jConnectionConfig
) -> None:
    """Two loops lock two nodes in opposite orders: Neo4j kills one, the driver retries it."""
    bolt_server.create_database()
    _hot_slots(bolt_server, "ab")
    b = Broker(bolt_config.replace(max_transaction_retry_time=30.0))
    writes = Writes()
    meet = threading.Barrier(2)

    def one(task: str, keys: tuple[str, str]) -> None:
        asyncio.run(_write_pair(b, writes, task, keys, meet))

    try:
        _on_threads(one, [("left", ("a", "b")), ("right", ("b", "a"))], timeout=90)
    finally:
        await b.aclose(timeout=5)
    assert sorted(writes.committed) == ["left", "right"]
    assert sum(writes.attempts.values()) >= 3, f"no deadlock was retried: {writes.attempts}"
    assert _landed(bolt_server) == (["left", "right"], {"a": 2, "b": 2}), "each write once"


async def test_concurrent_merge_lands_every_write_exactly_once(
    bolt_server: BoltServer, bolt_config: Neo4jConnectionConfig
) -> None:
    """3 threads x 2 loops x 8 writes on 3 hot nodes, in random lock orders."""
    bolt_server.create_database()
    _hot_slots(bolt_server, "xyz")
    b = Broker(bolt_config.replace(max_transaction_retry_time=60.0, pool_max_size=4))
    writes = Writes()
    orders = [("x", "y"), ("y", "z"), ("z", "x"), ("y", "x"), ("x", "z"), ("z", "y")]

    def thread_main(thread: int) -> None:
        for loop in range(2):
            jobs = [(f"{thread}-{loop}-{i}", orders[(thread + i) % 6]) for i in range(8)]
            _in_own_loop(b, writes, jobs)

    try:
        _on_threads(thread_main, [(t,) for t in range(3)], timeout=180)
    finally:
        await b.aclose(timeout=5)
    tasks = sorted(f"{t}-{lo}-{i}" for t in range(3) for lo in range(2) for i in range(8))
    assert sorted(writes.committed) == tasks
    ids, slots = _landed(bolt_server)
    assert ids == tasks, "a retried write landed twice, or not at all"
    assert sorted(slots) == ["x", "y", "z"] and sum(slots.values()) == 2 * len(tasks), slots
    print(f"\nconcurrent MERGE: {sum(writes.attempts.values()) - len(tasks)} retries")


# -- kill -9 under a write load ----------------------------------------------------------


async def test_acknowledged_writes_survive_kill_and_restart(restartable_server: Any) -> None:
    server = as_neo4j(restartable_server)
    config = Neo4jConnectionConfig(
        uri=server.uri, username=server.auth[0], password=server.auth[1]
    ).replace(borrow_timeout=2.0, connection_timeout=1.0, max_transaction_retry_time=1.0)
    b = Broker(config)
    acknowledged: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        async def one() -> None:
            marker = uuid.uuid4().hex
            try:
                async with b.borrow() as conn:
                    await asyncio.wait_for(
                        conn.driver.execute_query("CREATE (:Durable {id: $id})", id=marker), 3
                    )
                acknowledged.append(marker)
            except Exception as exc:
                failed.append(type(exc).__name__)

        while not stop.is_set():
            asyncio.run(one())
            time.sleep(0.02)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        await asyncio.sleep(2.0)
        server.kill()
        before = len(acknowledged)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.restart)
        back = len(acknowledged)
        await asyncio.sleep(4.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        await b.aclose(timeout=5)
    assert before > 0 and failed, "writes went through, then the outage was felt"
    assert len(acknowledged) > back, "writes went through again after the restart"
    stored = _count(
        server, "MATCH (d:Durable) WHERE d.id IN $ids RETURN count(d)", ids=acknowledged
    )
    assert stored == len(acknowledged), "an acknowledged write was lost by kill -9"


# -- TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["bolt+ssc", "neo4j+ssc"])
async def test_tls_front_toas_neo4j(bolt_server: BoltServer, scheme: str) -> None:
    server = as_neo4j(bolt_server)
    with TlsFront.for_uri(server.uri) as front:
        config = Neo4jConnectionConfig(
            uri=front.uri(scheme),
            username=server.auth[0],
            password=server.auth[1],
            driver_options=front.driver_options(scheme),
            pool_min_size=0,
        )
        b = Broker(config)
        try:
            async with b.borrow() as conn:
                records, summary, _ = await conn.driver.execute_query("RETURN 1 AS one")
                agent = summary.server.agent
        finally:
            await b.aclose(timeout=5)
        assert records[0]["one"] == 1
        assert agent.startswith("Neo4j/"), agent
        assert front.accepted >= 1, "the connection went through the front"
