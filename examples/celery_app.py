"""A Celery app whose async tasks share one pool of drivers per worker thread.

Start a worker with the database in the environment (``NEO4J_URI``,
``NEO4J_USERNAME``, ``NEO4J_PASSWORD``; see ``python -m broker.testing.server``
for a local one)::

    celery -A examples.celery_app worker -P threads -c 4

Transport (``examples/celery_config.py``): Redis at ``CELERY_BROKER_URL``
(default ``redis://localhost:6379/0``), results there too; tasks are
acknowledged late and handed back when their worker dies. Run it with
``-P custom`` and ``CELERY_CUSTOM_WORKER_POOL=broker.celery_asyncio:AsyncioPool``
for many tasks at once on one event loop.

The broker's events are written as JSON lines, each with the task's id and
name, to the file named by ``BROKER_LOG_JSON`` (default: standard error), at
the level in ``BROKER_LOG_LEVEL`` (default ``DEBUG``: one line per borrow and
return).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import neo4j
import structlog
from celery import Celery, signals

import broker
import broker.celery
from examples.celery_config import celery_settings

app = Celery("examples.celery_app")
app.conf.update(celery_settings())
broker.celery.setup(app)  # the default broker, from NEO4J_* when the worker starts


# -- tasks -----------------------------------------------------------------------


_flight_lock = threading.Lock()
_in_flight = 0
_peak_in_flight = 0  # the most ingest tasks this process ran at one moment


@contextlib.contextmanager
def _counted() -> Iterator[None]:
    global _in_flight, _peak_in_flight
    with _flight_lock:
        _in_flight += 1
        _peak_in_flight = max(_peak_in_flight, _in_flight)
    try:
        yield
    finally:
        with _flight_lock:
            _in_flight -= 1


@broker.celery.task(app, name="examples.ingest")
async def ingest(
    workspace: str, doc: str, entities: int = 3, hold: float = 0.0, linger: float = 0.0
) -> dict[str, Any]:
    """Write a document node linked to a few entity nodes, then read them back.

    The write is idempotent (``MERGE``): a task delivered twice, say after
    its first worker died, leaves each node and relationship once. ``hold``
    keeps the write transaction open that many seconds before it commits,
    ``linger`` keeps the task running that long after (written, not yet
    acknowledged); an ``ingest.committed`` event marks the commit.
    """
    with _counted():
        async with broker.borrow() as conn:
            database = await conn.prepare_database(workspace)
            # Nodes are keyed by the workspace too: its database may be shared.
            key = f"{workspace}/{doc}"
            names = [f"{key}/e{k}" for k in range(entities)]

            async def write(tx: neo4j.AsyncManagedTransaction) -> None:
                result = await tx.run(
                    "MERGE (d:base {entity_id: $key}) "
                    "SET d.kind = 'document', d.workspace = $workspace "
                    "WITH d UNWIND $names AS name "
                    "MERGE (e:base {entity_id: name}) "
                    "SET e.kind = 'entity', e.workspace = $workspace "
                    "MERGE (d)-[:MENTIONS]->(e)",
                    key=key,
                    workspace=workspace,
                    names=names,
                )
                await result.consume()
                if hold:
                    await asyncio.sleep(hold)

            # A managed transaction: run again on a transient error (a write
            # conflict with a concurrent task), which MERGE makes harmless.
            async with conn.driver.session(database=database) as session:
                await session.execute_write(write)
            _report.debug("ingest.committed", key=key)
            if linger:
                await asyncio.sleep(linger)
            records, _, _ = await conn.driver.execute_query(
                "MATCH (d:base {entity_id: $key})-[:MENTIONS]->(e:base) "
                "RETURN count(e) AS relationships, collect(e.entity_id) AS entities",
                key=key,
                database_=database,
            )
    found = records[0]
    return {
        "workspace": workspace,
        "database": database,
        "doc": doc,
        "relationships": found["relationships"],
        "entities_ok": sorted(found["entities"]) == sorted(names),
        "thread": threading.current_thread().name,
        "pid": os.getpid(),
        "loop": id(asyncio.get_running_loop()),
    }


@broker.celery.task(app, name="examples.probe", bind=True)
async def probe(self: Any, mark: str) -> dict[str, Any]:
    """What a task sees: its structlog context, its thread, loop and driver.

    It binds ``probe_mark`` itself; the next task on the same thread must not
    see it (each ``broker.run`` call gets a fresh copy of the context).
    """
    seen = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(probe_mark=mark)
    async with broker.borrow() as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS one")
        driver = id(conn.driver)
    return {
        "task_id": self.request.id,
        "mark": mark,
        "seen": {key: str(value) for key, value in seen.items()},
        "thread": threading.current_thread().name,
        "pid": os.getpid(),
        "loop": id(asyncio.get_running_loop()),
        "driver": driver,
        "ok": records[0]["one"] == 1,
    }


@app.task(name="examples.count_fresh_loop")
def count_fresh_loop(workspace: str) -> dict[str, Any]:
    """The ``asyncio.run`` pattern: a new loop, so a new pool, closed when the run ends."""

    async def count() -> int:
        async with broker.borrow() as conn:
            database = await conn.prepare_database(workspace)
            records, _, _ = await conn.driver.execute_query(
                "MATCH (n:base {workspace: $workspace}) RETURN count(n) AS n",
                workspace=workspace,
                database_=database,
            )
            return int(records[0]["n"])

    nodes = asyncio.run(count())
    return {"nodes": nodes, "totals": broker.totals(), "thread": threading.current_thread().name}


@app.task(name="examples.worker_stats")
def worker_stats() -> dict[str, Any]:
    """The worker process's pools: per-loop counters and totals over every loop."""
    return {
        "pid": os.getpid(),
        "loops": broker.stats_sync(),
        "totals": broker.totals(),
        "peak_in_flight": _peak_in_flight,
    }


# -- logging and the shutdown report ------------------------------------------------


def _json_handler() -> logging.Handler:
    target = os.environ.get("BROKER_LOG_JSON")
    handler: logging.Handler
    if target:
        handler = logging.FileHandler(target, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)

    def add_process(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event["pid"] = os.getpid()
        return event

    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.TimeStamper(fmt="iso"),
                add_process,
                structlog.processors.JSONRenderer(),
            ]
        )
    )
    return handler


_report = structlog.wrap_logger(
    logging.getLogger("celery_app"),
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
    wrapper_class=structlog.stdlib.BoundLogger,
)


_json_logs_on = False


@signals.after_setup_logger.connect(weak=False)
def json_logs(**_: Any) -> None:
    """Broker events (and this module's report) as JSON lines, apart from Celery's own log."""
    global _json_logs_on
    if _json_logs_on:  # once per process tree: prefork children inherit the handler
        return
    _json_logs_on = True
    handler = _json_handler()
    level = os.environ.get("BROKER_LOG_LEVEL", "DEBUG").upper()
    for name in ("broker", "celery_app"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def bolt_port() -> int:
    uri = os.environ.get("NEO4J_URI", "neo4j://localhost:7687")
    return urllib.parse.urlsplit(uri).port or 7687


def _report_sockets(**_: Any) -> None:
    # Connected after setup(), so it runs once the pools have closed.
    if not Path("/proc/self/fd").is_dir():
        return
    from broker.testing.sockets import open_connections

    _report.info("worker.bolt_sockets", open=open_connections(bolt_port()), pid=os.getpid())


signals.worker_shutdown.connect(_report_sockets, weak=False)
signals.worker_process_shutdown.connect(_report_sockets, weak=False)
