"""The seed's worker hooks, connected to Celery's signals, in a real ``celery worker``.

The app below is wired the seed's way and not with ``broker.celery.setup``:
``setup_worker_neo4j_config`` on ``worker_process_init`` and
``cleanup_worker_neo4j_config`` on ``worker_process_shutdown``, which only a
prefork worker sends (in each child). Its tasks borrow with the seed's
factory, some in ``asyncio.run`` per task as the seed's tasks did, some on
the thread's persistent loop (``broker.run``), whose pool is still open when
the child shuts down.
"""

from __future__ import annotations

import json
import uuid

import pytest

from broker.testing import BoltServer
from tests.test_celery import POOL_MAX_SIZE, celery_worker, wait_all

pytestmark = pytest.mark.celery

SEED_APP = '''
"""A Celery app with the seed design's worker hooks."""
import asyncio
import json
import logging
import os
import sys
import urllib.parse

import structlog
from celery import Celery, signals

import broker
from broker import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionFactory,
    cleanup_worker_neo4j_config,
    setup_worker_neo4j_config,
)
from broker.testing.sockets import open_connections
from examples.celery_config import celery_settings

app = Celery("seed_app")
app.conf.update(celery_settings())

signals.worker_process_init.connect(setup_worker_neo4j_config, weak=False)
signals.worker_process_shutdown.connect(cleanup_worker_neo4j_config, weak=False)


def bolt_port():
    return urllib.parse.urlsplit(os.environ["NEO4J_URI"]).port


def report(event, **fields):
    # One write per line: the children share the output file, and print()
    # writes the text and its newline separately, so lines could interleave.
    line = json.dumps({"event": event, "pid": os.getpid(), **fields})
    os.write(sys.stderr.fileno(), f"SEED {line}\\n".encode())


@signals.worker_process_init.connect(weak=False)
def after_setup(**_):
    config = GlobalNeo4jConnectionPool.get_config()
    report(
        "configured",
        uri=config.uri,
        pool_max_size=config.pool_max_size,
        sockets=open_connections(bolt_port()),
    )


@signals.worker_process_shutdown.connect(weak=False)
def after_cleanup(**_):
    report("cleaned", sockets=open_connections(bolt_port()), live=len(broker.stats_sync()))


@signals.after_setup_logger.connect(weak=False)
def json_logs(**_):
    handler = logging.FileHandler(os.environ["BROKER_LOG_JSON"], encoding="utf-8")
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer())
    )
    logger = logging.getLogger("broker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@app.task(name="seed.lightrag")
def lightrag(workspace, doc, persistent):
    async def lightrag_task():
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            driver = await conn.get_driver()
            database = await conn.prepare_database(workspace)
            records, _, _ = await driver.execute_query(
                "MERGE (n:base {entity_id: $id}) RETURN n.entity_id AS id",
                id=doc,
                database_=database,
            )
            stats = await Neo4jConnectionFactory.get_pool_stats()
            here = stats[str(id(asyncio.get_running_loop()))]
        return {"id": records[0]["id"], "in_use": here["in_use"], "pid": os.getpid()}

    return broker.run(lightrag_task()) if persistent else asyncio.run(lightrag_task())
'''


@pytest.mark.slow
def test_seed_hooks_on_a_prefork_worker(bolt_server: BoltServer, celery_broker_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    with celery_worker(
        bolt_server,
        celery_broker_url,
        "prefork",
        concurrency=2,
        app="seed_app",
        modules={"seed_app": SEED_APP},
    ) as live:
        sent = [
            live.client.send_task(
                "seed.lightrag", args=(f"seed-worker-{tag}", f"{tag}/doc-{n}", n % 2 == 1)
            )
            for n in range(16)
        ]
        results = wait_all(sent)
        run = live.stop()

    assert [r["id"] for r in results] == [f"{tag}/doc-{n}" for n in range(16)]
    assert all(r["in_use"] == 1 for r in results), "stats keyed by str(id(loop)) in each task"
    reports = [
        json.loads(line.removeprefix("SEED "))
        for line in run.output.splitlines()
        if line.startswith("SEED ")
    ]
    children = {r["pid"] for r in results}
    configured = {r["pid"]: r for r in reports if r["event"] == "configured"}
    cleaned = {r["pid"]: r for r in reports if r["event"] == "cleaned"}
    closed = {e["pid"]: e for e in run.named("compat.pools_closed")}
    assert children <= set(configured) and set(configured) == set(cleaned) == set(closed)
    for pid, setup in configured.items():
        # setup_worker_neo4j_config() read NEO4J_* and connected nothing.
        assert setup["uri"] == bolt_server.uri
        assert setup["pool_max_size"] == POOL_MAX_SIZE
        assert setup["sockets"] == 0
        # cleanup_worker_neo4j_config() closed every pool of the child, in its loop.
        assert closed[pid]["created"] == closed[pid]["closed"]
        assert cleaned[pid]["sockets"] == 0 and cleaned[pid]["live"] == 0
    assert sum(c["created"] for c in closed.values()) >= 2
    assert run.exit_code == 0, run.output[-3000:]
    assert run.bad_lines() == []
