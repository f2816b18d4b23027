"""Celery as it runs in production: several workers on one Redis queue, a crash, an asyncio pool.

Every worker is a real ``celery worker`` process running ``examples.celery_app``
on the session's Redis and Bolt server. What is asserted about a worker is
read from its own output: its JSON log (broker events, the pools it closed,
the Bolt sockets it had open after shutdown), its Celery log (which tasks it
received and finished) and what its tasks reported.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import broker
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from examples.celery_config import RESTORE_ENV, VISIBILITY_ENV
from tests.helpers import bolt_port, eventually_sync
from tests.test_celery import (
    POOL_MAX_SIZE,
    LiveWorker,
    WorkerRun,
    celery_client,
    celery_worker,
    close_client,
    new_queue,
    wait_all,
)

pytestmark = [pytest.mark.celery, pytest.mark.slow]

#: ``Task examples.ingest[<id>] succeeded in ...`` in a worker's Celery log.
SUCCEEDED = re.compile(r"Task examples\.ingest\[(?P<id>[0-9a-f-]{36})\] succeeded")

# TCP states of a server-side socket still open: established ... close-wait, last-ack.
_OPEN_STATES = {"01", "02", "03", "04", "05", "08", "09", "0B"}


def server_side_connections(port: int) -> int:
    """Sockets listening-side of ``port`` with a peer (the server's end of each connection)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] in _OPEN_STATES:
                    count += 1
    return count


def succeeded_ids(output: str) -> set[str]:
    return {match["id"] for match in SUCCEEDED.finditer(output)}


def broker_lines(run: WorkerRun) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("event") in ("borrow", "return")]


@contextlib.asynccontextmanager
async def own_broker(config: broker.Neo4jConnectionConfig) -> AsyncIterator[broker.Broker]:
    """A broker of the test's own, closed in the loop that used it."""
    b = broker.Broker(config.replace(pool_min_size=0))
    try:
        yield b
    finally:
        await b.aclose(timeout=10)


def graph_counts(config: broker.Neo4jConnectionConfig, workspaces: list[str]) -> dict[str, Any]:
    """Documents, entities and relationships per workspace, read by this test's own driver."""

    async def read() -> dict[str, Any]:
        async with own_broker(config) as b, b.borrow() as conn:
            counts = {}
            for workspace in workspaces:
                database = await conn.prepare_database(workspace)
                records, _, _ = await conn.driver.execute_query(
                    "MATCH (d:base {workspace: $ws, kind: 'document'}) "
                    "OPTIONAL MATCH (d)-[r:MENTIONS]->(:base) "
                    "RETURN count(DISTINCT d) AS docs, count(r) AS rels, "
                    "count(DISTINCT d.entity_id) AS keys",
                    ws=workspace,
                    database_=database,
                )
                counts[workspace] = dict(records[0])
            return counts

    return asyncio.run(read())


# -- three workers, one queue ------------------------------------------------------------

FLEET_TASKS = 600
FLEET_WORKSPACES = 8
#: name, pool, concurrency: how many tasks one process of it runs at once.
FLEET = (("threads", "threads", 4), ("prefork", "prefork", 2), ("solo", "solo", 1))
PER_PROCESS = {"threads": 4, "prefork": 1, "solo": 1}  # a prefork child runs one task


@dataclass
class FleetScenario:
    sent: list[str]  # task ids
    results: list[dict[str, Any]]
    runs: dict[str, WorkerRun]
    counts: dict[str, Any]
    workspaces: list[str]


@pytest.fixture(scope="module")
def fleet(bolt_server: BoltServer, celery_broker_url: str) -> FleetScenario:
    tag = uuid.uuid4().hex[:8]
    workspaces = [f"fleet-{tag}-{k}" for k in range(FLEET_WORKSPACES)]
    queue = new_queue()
    runs: dict[str, WorkerRun] = {}
    with contextlib.ExitStack() as stack:
        live: dict[str, LiveWorker] = {}
        for name, pool, concurrency in FLEET:
            live[name] = stack.enter_context(
                celery_worker(
                    bolt_server, celery_broker_url, pool, concurrency, queue=queue, name=name
                )
            )
        client = celery_client(celery_broker_url, queue)
        stack.callback(close_client, client)
        pending = [
            client.send_task("examples.ingest", args=(workspaces[n % FLEET_WORKSPACES], f"doc-{n}"))
            for n in range(FLEET_TASKS)
        ]
        results = wait_all(pending, timeout=240)
        for name, worker in live.items():
            runs[name] = worker.stop()  # warm shutdown, one after the other
    username, password = bolt_server.auth
    config = broker.Neo4jConnectionConfig(
        uri=bolt_server.uri,
        username=username,
        password=password,
        database=bolt_server.default_database,
    )
    counts = graph_counts(config, workspaces)
    return FleetScenario([r.id for r in pending], results, runs, counts, workspaces)


def test_fleet_every_task_succeeds_with_the_right_result(fleet: FleetScenario) -> None:
    assert len(fleet.results) == FLEET_TASKS
    for n, result in enumerate(fleet.results):
        assert result["workspace"] == fleet.workspaces[n % FLEET_WORKSPACES], result
        assert result["doc"] == f"doc-{n}"
        assert result["relationships"] == 3 and result["entities_ok"], result
    per_workspace = FLEET_TASKS // FLEET_WORKSPACES
    for counts in fleet.counts.values():
        assert counts == {"docs": per_workspace, "rels": 3 * per_workspace, "keys": per_workspace}
    # Each worker's own log: it ran some of the tasks, and together they ran each once.
    done = {name: succeeded_ids(run.output) for name, run in fleet.runs.items()}
    assert all(done.values()), {name: len(ids) for name, ids in done.items()}
    assert sum(len(ids) for ids in done.values()) == FLEET_TASKS
    assert set().union(*done.values()) == set(fleet.sent)
    for name, run in fleet.runs.items():
        assert run.exit_code == 0, (name, run.output[-3000:])
        assert run.bad_lines() == [], name


def test_fleet_each_process_stays_within_its_bound(fleet: FleetScenario) -> None:
    processes = 0
    for name, run in fleet.runs.items():
        closed = run.named("celery.pools_closed")
        assert closed, name
        for event in closed:
            processes += 1
            assert event["created"] == event["closed"], (name, event)
            assert event["created"] <= PER_PROCESS[name] * POOL_MAX_SIZE, (name, event)
            assert event["live_loops"] == 0
        borrowed = {e["pid"] for e in broker_lines(run)}
        if name == "prefork":  # the children did the work, each with pools of its own
            children = {e["pid"] for e in closed if e["reason"] == "worker_process_shutdown"}
            assert len(children) == 2 and borrowed <= children
        else:
            assert len(closed) == 1 and borrowed == {closed[0]["pid"]}
    assert processes == 1 + 3 + 1  # threads; prefork's master and two children; solo


def test_fleet_task_ids_in_every_broker_line(fleet: FleetScenario) -> None:
    sent = set(fleet.sent)
    lines = [line for run in fleet.runs.values() for line in broker_lines(run)]
    assert len(lines) == 2 * FLEET_TASKS  # one borrow and one return per task
    per_task = collections.Counter(line.get("task_id") for line in lines)
    assert set(per_task) == sent
    assert set(per_task.values()) == {2}
    assert {line["task_name"] for line in lines} == {"examples.ingest"}


def test_fleet_no_bolt_socket_left_after_warm_shutdown(fleet: FleetScenario) -> None:
    for name, run in fleet.runs.items():
        sockets = {e["pid"]: e["open"] for e in run.named("worker.bolt_sockets")}
        closed = {e["pid"] for e in run.named("celery.pools_closed")}
        assert set(sockets) == closed, name  # every process reported, after closing
        assert set(sockets.values()) == {0}, (name, sockets)


# -- kill -9 ------------------------------------------------------------------------------

KILL_TASKS = 40
# Seconds a task keeps its write transaction open: 1, 1.5, 2 or 2.5. Tasks that
# start together on the victim's threads then reach their commit at different
# moments, so one is still in its transaction while another is past its commit
# (with one hold for all, the four threads could keep in step: never both).
HOLDS = (1.0, 1.5, 2.0, 2.5)
LINGER = 1.0  # seconds it runs on after the commit, written but not acknowledged
VISIBILITY = 8  # seconds before a dead worker's messages are handed back


def in_progress(events: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """Tasks that borrowed and did not return: (in their transaction, past their commit)."""
    borrowed: set[str] = set()
    committed: set[str] = set()
    for event in events:
        name, task_id = event.get("event"), event.get("task_id")
        if name == "borrow":
            borrowed.add(task_id)
        elif name == "ingest.committed":
            committed.add(task_id)
        elif name == "return":
            borrowed.discard(task_id)
    return borrowed - committed, borrowed & committed


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(FileNotFoundError):
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(raw))
    return events


def wait_mid_task(victim: LiveWorker, timeout: float = 60) -> None:
    """Wait until the victim has a task in an open transaction and one written, unacknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        in_tx, written = in_progress(read_events(victim.work / "broker.jsonl"))
        if in_tx and written:
            return
        time.sleep(0.05)
    raise AssertionError("the victim never had a task in each phase at once")


def test_kill_9_mid_task_redelivers_to_another_worker(
    bolt_server: BoltServer, bolt_config: broker.Neo4jConnectionConfig, celery_broker_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    workspaces = [f"kill-{tag}-{k}" for k in range(2)]
    queue = new_queue()
    port = bolt_port(bolt_server)
    env = {VISIBILITY_ENV: str(VISIBILITY), RESTORE_ENV: "1"}
    baseline = server_side_connections(port)
    with (
        celery_worker(
            bolt_server, celery_broker_url, "threads", 4, queue=queue, name="victim", env=env
        ) as victim,
        celery_worker(
            bolt_server, celery_broker_url, "threads", 4, queue=queue, name="survivor", env=env
        ) as survivor,
    ):
        client = victim.client  # one queue: either worker's client sends to both
        pending = [
            client.send_task(
                "examples.ingest",
                args=(workspaces[n % 2], f"doc-{n}"),
                kwargs={"hold": HOLDS[n % len(HOLDS)], "linger": LINGER},
            )
            for n in range(KILL_TASKS)
        ]
        wait_mid_task(victim)
        victim.worker.proc.kill()  # SIGKILL: no shutdown, no acknowledgement
        victim.worker.proc.wait()
        results = wait_all(pending, timeout=120)
        # The server's end of the dead worker's connections goes away: only the
        # survivor's (and what was there before) stay.
        survivor_pid = survivor.worker.proc.pid
        deadline = time.monotonic() + 30
        while server_side_connections(port) > baseline + open_connections(port, survivor_pid):
            assert time.monotonic() < deadline, "the server kept the dead worker's sessions"
            time.sleep(0.1)
        victim_run = victim.stop()
        survivor_run = survivor.stop()

    assert victim_run.exit_code == -9
    assert [r for r in results if r["relationships"] != 3 or not r["entities_ok"]] == []
    # What the dead worker held when it died, from its own log: tasks in an
    # open write transaction, and tasks whose write was committed but which
    # had not finished (so were never acknowledged).
    in_tx, written = in_progress(victim_run.events)
    assert in_tx and written, (in_tx, written)
    held = in_tx | written
    # Each ran again on the survivor and completed there.
    assert held <= succeeded_ids(survivor_run.output)
    assert not held & succeeded_ids(victim_run.output)
    assert held <= {e["task_id"] for e in broker_lines(survivor_run) if e["event"] == "return"}
    # Each item once, though the written ones were written twice.
    per_workspace = KILL_TASKS // 2
    counts = graph_counts(bolt_config, workspaces)
    for workspace in workspaces:
        assert counts[workspace] == {
            "docs": per_workspace,
            "rels": 3 * per_workspace,
            "keys": per_workspace,
        }
    # No transaction or lock of the dead worker is left: the held items take a new write.
    keys = [f"{r['workspace']}/{r['doc']}" for r in results]

    async def touch() -> int:
        async with own_broker(bolt_config) as b, b.borrow() as conn:
            database = await conn.prepare_database(workspaces[0])
            records, _, _ = await asyncio.wait_for(
                conn.driver.execute_query(
                    "UNWIND $keys AS key MATCH (d:base {entity_id: key}) "
                    "SET d.touched = true RETURN count(d) AS n",
                    keys=keys,
                    database_=database,
                ),
                30,
            )
            return int(records[0]["n"])

    assert asyncio.run(touch()) == KILL_TASKS
    # After both workers ended, the server holds no session of theirs (nor,
    # once it has read their goodbye, of the check's own broker just closed).
    eventually_sync(
        lambda: server_side_connections(port) <= baseline, what="the server's sessions closed"
    )
    assert survivor_run.exit_code == 0
    assert survivor_run.bad_lines() == []
    [sockets] = survivor_run.named("worker.bolt_sockets")
    assert sockets["open"] == 0


# -- many tasks on one loop ---------------------------------------------------------------

AIO_TASKS = 48
AIO_CONCURRENCY = 16


@contextlib.contextmanager
def asyncio_worker(server: BoltServer, broker_url: str) -> Iterator[LiveWorker]:
    with celery_worker(server, broker_url, "asyncio", AIO_CONCURRENCY) as live:
        yield live


def test_asyncio_pool_runs_many_tasks_on_one_loop_within_the_bound(
    bolt_server: BoltServer, celery_broker_url: str
) -> None:
    workspace = f"aio-{uuid.uuid4().hex[:8]}"
    with asyncio_worker(bolt_server, celery_broker_url) as live:
        pending = [
            live.client.send_task(
                "examples.ingest", args=(workspace, f"doc-{n}"), kwargs={"hold": 0.3}
            )
            for n in range(AIO_TASKS)
        ]
        results = wait_all(pending)
        stats = live.call("examples.worker_stats")
        run = live.stop()

    assert all(r["relationships"] == 3 and r["entities_ok"] for r in results)
    # One loop, on the pool's own thread, served every task: one pool.
    [loop] = stats["loops"].values()
    assert loop["thread"] == "broker-asyncio-pool"
    assert {r["thread"] for r in results} == {"broker-asyncio-pool"}
    assert {str(r["loop"]) for r in results} == {loop["loop_id"]}
    assert loop["borrows"] == stats["totals"]["borrows"] == AIO_TASKS
    # Many at once (the worker counted them), sharing POOL_MAX_SIZE drivers:
    # the others waited their turn in the pool.
    assert stats["peak_in_flight"] > POOL_MAX_SIZE
    assert 1 <= stats["totals"]["created"] <= POOL_MAX_SIZE
    assert loop["max_size"] == POOL_MAX_SIZE
    assert stats["totals"]["requests_queued"] > 0
    # Each task's lines carry its own id, though all ran on one thread at once.
    lines = broker_lines(run)
    per_task = collections.Counter(line["task_id"] for line in lines)
    assert per_task == dict.fromkeys((r.id for r in pending), 2)
    assert max(line["in_use"] + line["waiting"] for line in lines) > POOL_MAX_SIZE
    assert {line["thread"] for line in lines} == {"broker-asyncio-pool"}
    # Warm shutdown: the loop ended after its pool closed its drivers.
    [closed] = run.named("celery.pools_closed")
    assert closed["created"] == closed["closed"] == stats["totals"]["created"]
    assert loop["loop"] in {e["loop"] for e in run.named("actor.stopped")}
    assert run.named("worker.bolt_sockets")[0]["open"] == 0
    assert run.exit_code == 0
    assert run.bad_lines() == []
