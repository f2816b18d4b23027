"""A graph storage in the shape of the seed design's real client, on the broker.

``GraphStorage`` is written here the way the seed's client wrote its Neo4j
graph storage: it imports the factory next to ``BorrowedConnection``, borrows
in ``initialize()`` with a manual ``__aenter__``, gets the driver and
prepares the workspace's database there, runs every query in a session of
its own against ``(n:base {entity_id: ...})`` with the workspace's label
added on upsert, and gives the driver back with ``__aexit__(None, None,
None)`` in ``finalize()``.

The test runs it from 4 threads x 25 tasks, half with ``asyncio.run`` per
task and half with ``broker.run``, three storages at once per task against a
pool of two drivers, and checks every value read back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any

import pytest
from neo4j import AsyncManagedTransaction

import broker
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually_sync

try:  # as the client imports them
    from broker import BorrowedConnection, Neo4jConnectionFactory
except ImportError:  # pragma: no cover - the failure this module guards against
    Neo4jConnectionFactory = None  # type: ignore[assignment,misc]
    BorrowedConnection = None  # type: ignore[assignment,misc]

EDGE_DEFAULTS: dict[str, Any] = {
    "weight": 0.0,
    "source_id": None,
    "description": None,
    "keywords": None,
}


class GraphStorage:
    """Nodes keyed by ``entity_id`` under the ``base`` label, edges between them."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self._borrowed: BorrowedConnection | None = None
        self._driver: Any = None
        self._database: str | None = None

    async def initialize(self) -> None:
        if Neo4jConnectionFactory is None:
            raise RuntimeError("Neo4j connection factory is not available")
        self._borrowed = Neo4jConnectionFactory.borrow_connection()
        await self._borrowed.__aenter__()
        self._driver = await self._borrowed.get_driver()
        self._database = await self._borrowed.prepare_database(self.workspace)

    async def finalize(self) -> None:
        self._driver = None
        if self._borrowed is not None:
            await self._borrowed.__aexit__(None, None, None)
            self._borrowed = None

    # -- reads -------------------------------------------------------------------

    async def _read(self, query: str, **params: Any) -> list[Any]:
        async with self._driver.session(
            database=self._database, default_access_mode="READ"
        ) as session:
            result = await session.run(query, params)
            records = [record async for record in result]
            await result.consume()
            return records

    async def has_node(self, node_id: str) -> bool:
        [record] = await self._read(
            "MATCH (n:base {entity_id: $entity_id}) RETURN count(n) > 0 AS found",
            entity_id=node_id,
        )
        return bool(record["found"])

    async def has_edge(self, source: str, target: str) -> bool:
        [record] = await self._read(
            "MATCH (a:base {entity_id: $source})-[r]-(b:base {entity_id: $target}) "
            "RETURN count(r) > 0 AS found",
            source=source,
            target=target,
        )
        return bool(record["found"])

    async def get_node(self, node_id: str) -> dict[str, Any] | None:
        records = await self._read(
            "MATCH (n:base {entity_id: $entity_id}) RETURN n", entity_id=node_id
        )
        return dict(records[0]["n"]) if records else None

    async def node_labels(self, node_id: str) -> set[str]:
        [record] = await self._read(
            "MATCH (n:base {entity_id: $entity_id}) RETURN labels(n) AS labels",
            entity_id=node_id,
        )
        return set(record["labels"])

    async def get_nodes_batch(self, node_ids: list[str]) -> dict[str, dict[str, Any]]:
        records = await self._read(
            "UNWIND $ids AS id MATCH (n:base {entity_id: id}) RETURN n.entity_id AS id, n",
            ids=node_ids,
        )
        return {record["id"]: dict(record["n"]) for record in records}

    async def node_degree(self, node_id: str) -> int:
        records = await self._read(
            "MATCH (n:base {entity_id: $entity_id}) OPTIONAL MATCH (n)-[r]-() "
            "RETURN count(r) AS degree",
            entity_id=node_id,
        )
        return int(records[0]["degree"]) if records else 0

    async def node_degrees_batch(self, node_ids: list[str]) -> dict[str, int]:
        records = await self._read(
            "UNWIND $ids AS id MATCH (n:base {entity_id: id}) "
            "RETURN n.entity_id AS id, count { (n)--() } AS degree",
            ids=node_ids,
        )
        degrees = {record["id"]: int(record["degree"]) for record in records}
        return {node_id: degrees.get(node_id, 0) for node_id in node_ids}

    async def edge_degree(self, source: str, target: str) -> int:
        return await self.node_degree(source) + await self.node_degree(target)

    async def edge_degrees_batch(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        degrees = await self.node_degrees_batch(sorted({n for pair in pairs for n in pair}))
        return {(a, b): degrees[a] + degrees[b] for a, b in pairs}

    async def get_edge(self, source: str, target: str) -> dict[str, Any] | None:
        records = await self._read(
            "MATCH (a:base {entity_id: $source})-[r]-(b:base {entity_id: $target}) "
            "RETURN properties(r) AS props",
            source=source,
            target=target,
        )
        return {**EDGE_DEFAULTS, **records[0]["props"]} if records else None

    async def get_edges_batch(self, pairs: list[dict[str, str]]) -> dict[tuple[str, str], Any]:
        records = await self._read(
            "UNWIND $pairs AS pair "
            "MATCH (a:base {entity_id: pair.src})-[r:DIRECTED]-(b:base {entity_id: pair.tgt}) "
            "RETURN pair.src AS src, pair.tgt AS tgt, collect(properties(r)) AS edges",
            pairs=pairs,
        )
        return {(r["src"], r["tgt"]): {**EDGE_DEFAULTS, **r["edges"][0]} for r in records}

    async def get_node_edges(self, node_id: str) -> list[tuple[str, str]]:
        records = await self._read(
            "MATCH (n:base {entity_id: $entity_id}) "
            "OPTIONAL MATCH (n)-[r]-(other:base) WHERE other.entity_id IS NOT NULL "
            "RETURN n.entity_id AS id, other.entity_id AS other",
            entity_id=node_id,
        )
        return [(r["id"], r["other"]) for r in records if r["other"] is not None]

    async def get_nodes_edges_batch(self, node_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
        records = await self._read(
            "UNWIND $ids AS id MATCH (n:base {entity_id: id}) "
            "OPTIONAL MATCH (n)-[r]-(other:base) "
            "RETURN id, other.entity_id AS other, startNode(r).entity_id AS start",
            ids=node_ids,
        )
        edges: dict[str, list[tuple[str, str]]] = {node_id: [] for node_id in node_ids}
        for r in records:
            if r["other"] is None:
                continue
            edge = (r["id"], r["other"]) if r["start"] == r["id"] else (r["other"], r["id"])
            edges[r["id"]].append(edge)
        return edges

    # -- writes ------------------------------------------------------------------

    async def _write(self, query: str, **params: Any) -> None:
        async def work(tx: AsyncManagedTransaction) -> None:
            result = await tx.run(query, params)
            await result.consume()

        async with self._driver.session(database=self._database) as session:
            await session.execute_write(work)

    async def upsert_node(self, node_id: str, node_data: dict[str, Any]) -> None:
        if "entity_id" not in node_data:
            raise ValueError("node properties must contain an 'entity_id' field")
        label = broker.quote_identifier(self.workspace)
        await self._write(
            f"MERGE (n:base {{entity_id: $entity_id}}) SET n += $properties SET n:{label}",
            entity_id=node_id,
            properties=node_data,
        )

    async def upsert_edge(self, source: str, target: str, edge_data: dict[str, Any]) -> None:
        await self._write(
            "MATCH (a:base {entity_id: $source}) WITH a "
            "MATCH (b:base {entity_id: $target}) "
            "MERGE (a)-[r:DIRECTED]-(b) SET r += $properties",
            source=source,
            target=target,
            properties=edge_data,
        )

    async def delete_node(self, node_id: str) -> None:
        await self._write(
            "MATCH (n:base {entity_id: $entity_id}) DETACH DELETE n", entity_id=node_id
        )

    async def remove_nodes(self, node_ids: list[str]) -> None:
        for node_id in node_ids:
            await self.delete_node(node_id)

    async def remove_edges(self, edges: list[tuple[str, str]]) -> None:
        for source, target in edges:
            await self._write(
                "MATCH (a:base {entity_id: $source})-[r]-(b:base {entity_id: $target}) DELETE r",
                source=source,
                target=target,
            )


# -- one task: a storage's whole life, every value checked ------------------------------


async def exercise(workspace: str, prefix: str) -> None:
    storage = GraphStorage(workspace)
    await storage.initialize()
    try:
        a, b, c, missing = (f"{prefix}/{name}" for name in ("a", "b", "c", "missing"))
        nodes = {
            a: {"entity_id": a, "entity_type": "person", "description": "first"},
            b: {"entity_id": b, "entity_type": "org", "description": "second"},
            c: {"entity_id": c, "entity_type": "org", "description": "third"},
        }
        for node_id, data in nodes.items():
            await storage.upsert_node(node_id, data)
        nodes[a] = {**nodes[a], "description": "first, updated", "source_id": prefix}
        await storage.upsert_node(a, nodes[a])
        ab = {"weight": 1.5, "description": "a-b", "keywords": "k1", "source_id": prefix}
        await storage.upsert_edge(a, b, ab)
        await storage.upsert_edge(c, a, {"weight": 2.0})

        assert await storage.has_node(a) and not await storage.has_node(missing)
        assert await storage.has_edge(b, a) and not await storage.has_edge(b, c)
        assert await storage.get_node(a) == nodes[a]
        assert await storage.get_node(missing) is None
        assert {"base", workspace} <= await storage.node_labels(a)
        assert await storage.get_nodes_batch([a, b, missing]) == {a: nodes[a], b: nodes[b]}
        assert await storage.node_degree(a) == 2
        assert await storage.node_degrees_batch([a, b, c, missing]) == {
            a: 2,
            b: 1,
            c: 1,
            missing: 0,
        }
        assert await storage.edge_degree(a, b) == 3
        assert await storage.edge_degrees_batch([(a, b), (c, a)]) == {(a, b): 3, (c, a): 3}
        assert await storage.get_edge(b, a) == ab
        assert await storage.get_edge(b, c) is None
        assert await storage.get_edges_batch([{"src": a, "tgt": b}, {"src": c, "tgt": a}]) == {
            (a, b): ab,
            (c, a): {**EDGE_DEFAULTS, "weight": 2.0},
        }
        assert sorted(await storage.get_node_edges(a)) == [(a, b), (a, c)]
        edges = await storage.get_nodes_edges_batch([a, b])
        assert {node: sorted(found) for node, found in edges.items()} == {
            a: sorted([(a, b), (c, a)]),
            b: [(a, b)],
        }

        await storage.remove_edges([(a, c)])
        assert not await storage.has_edge(c, a)
        assert await storage.node_degree(a) == 1
        await storage.delete_node(b)
        assert not await storage.has_node(b) and not await storage.has_edge(a, b)
        assert await storage.node_degrees_batch([a, b, c]) == {a: 0, b: 0, c: 0}
        await storage.remove_nodes([a, c])
        assert await storage.get_nodes_batch([a, b, c]) == {}
    finally:
        await storage.finalize()


async def task(workspace: str, prefix: str, storages: int) -> None:
    await asyncio.gather(*(exercise(workspace, f"{prefix}/s{s}") for s in range(storages)))


async def make_labels(workspaces: list[str], tag: str) -> None:
    for workspace in workspaces:
        storage = GraphStorage(workspace)
        await storage.initialize()
        try:
            await storage.upsert_node(f"{tag}/label", {"entity_id": f"{tag}/label"})
            await storage.delete_node(f"{tag}/label")
        finally:
            await storage.finalize()


THREADS = 4
TASKS = 25
STORAGES = 3  # at once per task: one more than the pool holds
POOL_MAX_SIZE = 2


@pytest.mark.slow
def test_client_shaped_storage_in_many_threads_and_loops(
    bolt_config: broker.Neo4jConnectionConfig,
    bolt_server: BoltServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert BorrowedConnection is not None, "the client would fail to import its factory"
    caplog.set_level(logging.INFO)
    port = bolt_port(bolt_server)
    broker.GlobalNeo4jConnectionPool.set_config(
        bolt_config.replace(pool_max_size=POOL_MAX_SIZE, pool_min_size=0)
    )
    tag = uuid.uuid4().hex[:8]
    workspaces = [f"seed-client-{tag}-{t}" for t in range(THREADS)]
    # ArcadeDB makes a type for each new label and fails a transaction that
    # races another one making it (the client retried such errors): make each
    # workspace's label once, through the storage, before the run.
    asyncio.run(make_labels(workspaces, tag))
    errors: list[tuple[str, int, BaseException]] = []
    done: list[tuple[str, int]] = []

    def thread_main(t: int) -> None:
        name = threading.current_thread().name
        run_one = asyncio.run if t % 2 == 0 else broker.run
        for k in range(TASKS):
            try:
                run_one(task(workspaces[t], f"{tag}/{t}/{k}", STORAGES))
                done.append((name, k))
            except BaseException as exc:  # collected and asserted below
                errors.append((name, k, exc))

    threads = [
        threading.Thread(target=thread_main, args=(t,), name=f"seed-client-{t}")
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    try:
        assert not any(thread.is_alive() for thread in threads)
        assert errors == [], [(n, k, repr(e), str(e)[:900]) for n, k, e in errors[:3]]
        assert len(done) == THREADS * TASKS
        assert not [r for r in caplog.records if "different loop" in r.getMessage()]

        # The broker.run threads kept one loop each, and never more drivers than the bound.
        live = broker.stats_sync()
        per_thread = {entry["thread"]: entry for entry in live.values()}
        assert set(per_thread) == {"seed-client-1", "seed-client-3"}, live
        for entry in per_thread.values():
            assert entry["borrows"] == TASKS * STORAGES
            assert 1 <= entry["created"] <= POOL_MAX_SIZE
            assert entry["in_use"] == 0 and entry["total"] <= POOL_MAX_SIZE
        # Every asyncio.run task had a pool of its own, closed when its loop ended.
        totals = broker.totals()
        assert totals["borrows"] == THREADS * TASKS * STORAGES + len(workspaces)
        assert totals["created"] - totals["closed"] == sum(
            e["created"] - e["closed"] for e in per_thread.values()
        )
        assert open_connections(port) >= len(per_thread), "the kept pools hold sockets"
    finally:
        broker.cleanup_worker_neo4j_config()
    eventually_sync(lambda: open_connections(port) == 0, what="every Bolt socket closed")
    assert broker.totals()["created"] == 0, "a fresh default broker after the cleanup"
