"""A Celery app whose async tasks share one pool of drivers per worker thread.

Start a worker with the database in the environment (``NEO4J_URI``,
``NEO4J_USERNAME``, ``NEO4J_PASSWORD``; see ``python -m broker.testing.server``
for a local one)::

    celery -A examples.celery_app worker -P threads -c 4

Transport (``examples/celery_config.py``): with ``CELERY_BROKER_URL`` unset,
kombu's filesystem transport in the directory named by ``BROKER_CELERY_DIR``,
so no message server is needed; results are files there too.

The broker's events are written as JSON lines, each with the task's id and
name, to the file named by ``BROKER_LOG_JSON`` (default: standard error), at
the level in ``BROKER_LOG_LEVEL`` (default ``DEBUG``: one line per borrow and
return).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import structlog
from celery import Celery, signals

import broker
import broker.celery
from examples.celery_config import celery_settings

app = Celery("examples.celery_app")
app.conf.update(celery_settings())
broker.celery.setup(app)  # the default broker, from NEO4J_* when the worker starts


# -- tasks -----------------------------------------------------------------------


@broker.celery.task(app, name="examples.ingest")
async def ingest(workspace: str, doc: str, entities: int = 3) -> dict[str, Any]:
    """Write a document node linked to a few entity nodes, then read them back."""
    async with broker.borrow() as conn:
        database = await conn.prepare_database(workspace)
        label = broker.quote_identifier(workspace)
        names = [f"{doc}/e{k}" for k in range(entities)]
        await conn.driver.execute_query(
            f"CREATE (d:{label} {{entity_id: $doc, kind: 'document'}}) "
            "WITH d UNWIND $names AS name "
            f"CREATE (d)-[:MENTIONS]->(:{label} {{entity_id: name, kind: 'entity'}})",
            doc=doc,
            names=names,
            database_=database,
        )
        records, _, _ = await conn.driver.execute_query(
            f"MATCH (d:{label} {{entity_id: $doc}})-[:MENTIONS]->(e:{label}) "
            "RETURN count(e) AS relationships, collect(e.entity_id) AS entities",
            doc=doc,
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
            label = broker.quote_identifier(workspace)
            records, _, _ = await conn.driver.execute_query(
                f"MATCH (n:{label}) RETURN count(n) AS n", database_=database
            )
            return int(records[0]["n"])

    nodes = asyncio.run(count())
    return {"nodes": nodes, "totals": broker.totals(), "thread": threading.current_thread().name}


@app.task(name="examples.worker_stats")
def worker_stats() -> dict[str, Any]:
    """The worker process's pools: per-loop counters and totals over every loop."""
    return {"pid": os.getpid(), "loops": broker.stats_sync(), "totals": broker.totals()}


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
