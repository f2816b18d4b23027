"""broker.celery: real Celery workers (-P threads, solo, prefork) against a real Bolt server.

The worker runs ``examples.celery_app`` in a subprocess, on the session's
Redis (``celery_broker_url``), with a queue of the test's own. Its broker
events come back as JSON lines (each with the task's id), its standard output
and error as text.
In-process tests at the end check ``setup()``'s signal wiring directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

import broker
import broker.celery
from broker import runner
from broker.testing import BoltServer
from broker.testing import server as server_module
from broker.testing.sockets import open_connections
from examples.celery_config import QUEUE_ENV, celery_settings
from examples.celery_demo import ROOT, Worker
from tests.helpers import bolt_port

pytestmark = pytest.mark.celery

CONCURRENCY = 4
POOL_MAX_SIZE = 2
INGESTS = 220
PROBE_EVERY = 8  # one probe task after every 8 ingest tasks

#: What must never show up in a worker's output.
BAD_OUTPUT = (
    "attached to a different loop",
    "Task was destroyed but it is pending",
    "Exception ignored",
    "unclosed event loop",
    "Event loop is closed",
    "Traceback",
)


# -- running a worker ------------------------------------------------------------


@dataclass
class WorkerRun:
    """What a finished worker left behind."""

    exit_code: int
    output: str
    events: list[dict[str, Any]]
    secrets: set[str] = field(default_factory=set)

    def bad_lines(self) -> list[str]:
        text = self.output + "\n" + "\n".join(json.dumps(e) for e in self.events)
        return [line for line in text.splitlines() if any(bad in line for bad in BAD_OUTPUT)]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


@dataclass
class LiveWorker:
    worker: Worker
    client: Celery
    work: Path
    secrets: set[str]

    def call(self, name: str, *args: Any, timeout: float = 60) -> Any:
        return self.client.send_task(name, args=args).get(timeout=timeout, interval=0.05)

    def stop(self) -> WorkerRun:
        code = self.worker.stop()
        events = []
        with contextlib.suppress(FileNotFoundError):
            for raw in (self.work / "broker.jsonl").read_text(errors="replace").splitlines():
                events.append(json.loads(raw))
        return WorkerRun(code, self.worker.output(), events, self.secrets)


def new_queue() -> str:
    """A queue of the test's own: nothing another test left on the server reaches it."""
    return f"broker-test-{uuid.uuid4().hex[:12]}"


def celery_client(broker_url: str, queue: str) -> Celery:
    client = Celery(f"test-client-{queue}", set_as_current=False)
    client.conf.update(celery_settings())
    client.conf.update(broker_url=broker_url, result_backend=broker_url, task_default_queue=queue)
    return client


def close_client(client: Celery) -> None:
    """Stop listening for results while Redis still runs.

    A result never waited for stays subscribed; collected after Redis has
    stopped, it would try to unsubscribe on a dead connection.
    """
    consumer = getattr(client.backend, "result_consumer", None)
    if consumer is not None:
        with contextlib.suppress(Exception):
            consumer.subscribed_to.clear()
            consumer.stop()
    client.close()


@contextlib.contextmanager
def celery_worker(
    server: BoltServer,
    broker_url: str,
    pool: str,
    concurrency: int = CONCURRENCY,
    app: str = "examples.celery_app",
    modules: dict[str, str] | None = None,
    *,
    queue: str | None = None,
    name: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[LiveWorker]:
    """A real ``celery worker`` subprocess; always stopped, its directory always removed.

    ``modules`` (name -> source) are written where the worker can import them.
    Workers given one ``queue`` share its tasks; ``env`` adds to the worker's
    environment.
    """
    queue = queue or new_queue()
    work = Path(tempfile.mkdtemp(prefix="broker-celery-test-"))
    (work / "modules").mkdir()
    for module, source in (modules or {}).items():
        (work / "modules" / f"{module}.py").write_text(source)
    username, password = server.auth
    path = [str(ROOT), str(work / "modules"), os.environ.get("PYTHONPATH")]
    worker_env = {
        **os.environ,
        "NEO4J_URI": server.uri,
        "NEO4J_USERNAME": username,
        "NEO4J_PASSWORD": password,
        "NEO4J_DATABASE": server.default_database,
        "NEO4J_POOL_MAX_SIZE": str(POOL_MAX_SIZE),
        "NEO4J_POOL_MIN_SIZE": "1",
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": broker_url,
        QUEUE_ENV: queue,
        "BROKER_LOG_JSON": str(work / "broker.jsonl"),
        "BROKER_LOG_LEVEL": "DEBUG",
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
        # Show ResourceWarnings (unclosed loops, sockets) instead of hiding them.
        "PYTHONWARNINGS": "default",
        **(env or {}),
    }
    worker = client = None
    try:
        worker = Worker(
            worker_env,
            work / "worker.log",
            pool=pool,
            concurrency=concurrency,
            app=app,
            name=name or f"{pool}-{uuid.uuid4().hex[:6]}",
        )
        worker.wait_ready()
        client = celery_client(broker_url, queue)
        yield LiveWorker(worker, client, work, {password} if len(password) >= 6 else set())
    finally:
        if worker is not None:
            worker.stop()
        if client is not None:
            close_client(client)
        shutil.rmtree(work, ignore_errors=True)


def wait_all(results: list[Any], timeout: float = 180) -> list[Any]:
    """Every result's value, in order; raises the first task error."""
    deadline = time.monotonic() + timeout
    values = []
    for result in results:
        values.append(result.get(timeout=max(1.0, deadline - time.monotonic()), interval=0.05))
    return values


# -- -P threads: the main case, run once for the tests below -------------------------


@dataclass
class ThreadsScenario:
    ingests: list[tuple[str, dict[str, Any]]]  # (task id, result)
    probes: list[dict[str, Any]]
    stats: dict[str, Any]
    fresh: list[tuple[str, dict[str, Any]]]  # (task id, result)
    connections_at_start: int
    connections_after_tasks: int
    run: WorkerRun
    seconds: float


@pytest.fixture(scope="module")
def threads_scenario(bolt_server: BoltServer, celery_broker_url: str) -> ThreadsScenario:
    started = time.monotonic()
    tag = uuid.uuid4().hex[:8]
    workspaces = [f"celery-{tag}-{k}" for k in range(4)]
    with celery_worker(bolt_server, celery_broker_url, "threads") as live:
        pid, port = live.worker.proc.pid, bolt_port(bolt_server)
        at_start = open_connections(port, pid=pid)
        sent: list[tuple[str, Any]] = []
        for n in range(INGESTS):
            args = (workspaces[n % len(workspaces)], f"doc-{tag}-{n}")
            sent.append(("ingest", live.client.send_task("examples.ingest", args=args)))
            if n % PROBE_EVERY == PROBE_EVERY - 1:
                mark = f"mark-{n}"
                sent.append(("probe", live.client.send_task("examples.probe", args=(mark,))))
        values = wait_all([result for _, result in sent])
        ingests = [
            (result.id, value)
            for (kind, result), value in zip(sent, values, strict=True)
            if kind == "ingest"
        ]
        probes = [value for (kind, _), value in zip(sent, values, strict=True) if kind == "probe"]
        stats = live.call("examples.worker_stats")
        after_tasks = open_connections(port, pid=pid)
        # The asyncio.run pattern, a few times: a new pool per task, closed with its loop.
        fresh = []
        for _ in range(3):
            result = live.client.send_task("examples.count_fresh_loop", args=(workspaces[0],))
            fresh.append((result.id, result.get(timeout=60, interval=0.05)))
        run = live.stop()
    seconds = time.monotonic() - started
    return ThreadsScenario(ingests, probes, stats, fresh, at_start, after_tasks, run, seconds)


@pytest.mark.slow
def test_threads_every_task_succeeds(threads_scenario: ThreadsScenario) -> None:
    s = threads_scenario
    assert len(s.ingests) == INGESTS >= 200
    for _, result in s.ingests:
        assert result["relationships"] == 3, result
        assert result["entities_ok"], result
    assert len(s.probes) == INGESTS // PROBE_EVERY
    assert all(p["ok"] for p in s.probes)
    assert s.run.exit_code == 0, s.run.output[-3000:]
    assert "succeeded" in s.run.output


@pytest.mark.slow
def test_threads_worker_start_makes_no_connection(threads_scenario: ThreadsScenario) -> None:
    assert threads_scenario.connections_at_start == 0
    # The same count, taken while the pools are alive, sees their sockets.
    assert threads_scenario.connections_after_tasks >= 1


@pytest.mark.slow
def test_threads_no_different_loop_errors_or_leftovers(threads_scenario: ThreadsScenario) -> None:
    run = threads_scenario.run
    assert run.bad_lines() == []
    assert run.named("driver.created"), "the worker's broker events were not captured"
    for secret in run.secrets:
        assert secret not in run.output
        assert all(secret not in json.dumps(e) for e in run.events)


@pytest.mark.slow
def test_threads_reuse_one_pool_per_thread_across_tasks(threads_scenario: ThreadsScenario) -> None:
    s = threads_scenario
    totals, loops = s.stats["totals"], s.stats["loops"]
    tasks = INGESTS + len(s.probes)
    assert totals["borrows"] == tasks
    # Without reuse every task would have made at least one driver.
    assert 1 <= totals["created"] <= CONCURRENCY * POOL_MAX_SIZE
    assert 1 <= len(loops) <= CONCURRENCY
    for loop in loops.values():
        assert loop["max_size"] == POOL_MAX_SIZE
        assert loop["total"] <= POOL_MAX_SIZE
        assert loop["state"] == "open"
    assert sum(loop["borrows"] for loop in loops.values()) == tasks
    threads = collections.Counter(result["thread"] for _, result in s.ingests)
    assert len(threads) <= CONCURRENCY
    assert {loop["thread"] for loop in loops.values()} == set(threads) | {
        p["thread"] for p in s.probes
    }
    # Each thread kept one loop for all of its tasks.
    loops_by_thread = collections.defaultdict(set)
    for probe in s.probes:
        loops_by_thread[probe["thread"]].add(probe["loop"])
    assert all(len(ids) == 1 for ids in loops_by_thread.values())


@pytest.mark.slow
def test_threads_shutdown_closes_every_driver_and_socket(threads_scenario: ThreadsScenario) -> None:
    run = threads_scenario.run
    [closed] = run.named("celery.pools_closed")
    assert closed["reason"] == "worker_shutdown"
    assert closed["created"] == closed["closed"] >= threads_scenario.stats["totals"]["created"]
    assert closed["live_loops"] == 0
    [sockets] = run.named("worker.bolt_sockets")
    assert sockets["open"] == 0
    assert sockets["pid"] == closed["pid"] == threads_scenario.stats["pid"]
    # Every loop's actor stopped after closing its drivers, in its own loop.
    stopped = {e["loop"] for e in run.named("actor.stopped")}
    assert set(threads_scenario.stats["loops"]) <= stopped
    assert run.exit_code == 0
    assert run.bad_lines() == []


@pytest.mark.slow
def test_asyncio_run_per_task_gets_a_pool_closed_with_its_loop(
    threads_scenario: ThreadsScenario,
) -> None:
    before = threads_scenario.stats["totals"]
    kept = before["created"] - before["closed"]  # the persistent loops' drivers
    previous = before
    for _, result in threads_scenario.fresh:
        assert result["nodes"] > 0
        totals = result["totals"]
        assert totals["created"] > previous["created"], "a new loop makes a new driver"
        assert totals["created"] - totals["closed"] == kept, "and closes it when it ends"
        previous = totals


@pytest.mark.slow
def test_task_ids_do_not_leak_between_tasks_on_a_thread(threads_scenario: ThreadsScenario) -> None:
    s = threads_scenario
    per_thread = collections.Counter(p["thread"] for p in s.probes)
    assert max(per_thread.values()) >= 2, "no thread ran two probes: nothing was tested"
    for probe in s.probes:
        assert probe["seen"] == {"task_id": probe["task_id"], "task_name": "examples.probe"}

    # Every borrow and return line carries the id of the task that made it, and
    # nothing bound by an earlier task.
    tasks: dict[str, tuple[str, str, str | None]] = {}  # id -> (name, thread, probe mark)
    for task_id, result in s.ingests:
        tasks[task_id] = ("examples.ingest", result["thread"], None)
    for probe in s.probes:
        tasks[probe["task_id"]] = ("examples.probe", probe["thread"], probe["mark"])
    for task_id, result in s.fresh:
        tasks[task_id] = ("examples.count_fresh_loop", result["thread"], None)
    lines = [e for e in s.run.events if e.get("event") in ("borrow", "return")]
    assert len(lines) == 2 * len(tasks)
    per_task: collections.Counter[str] = collections.Counter()
    for line in lines:
        task_id = line.get("task_id")
        assert task_id in tasks, line
        name, thread, mark = tasks[task_id]
        assert line["task_name"] == name, line
        assert line["thread"] == thread, line
        assert line.get("probe_mark") == mark, line
        per_task[task_id] += 1
    assert set(per_task.values()) == {2}
    # Events of the pools themselves (not of a task) carry no task id.
    for event in s.run.named("actor.stopped") + s.run.named("celery.pools_closed"):
        assert "task_id" not in event, event


# -- -P solo and -P prefork: smoke tests ----------------------------------------------


@pytest.mark.slow
def test_solo_worker(bolt_server: BoltServer, celery_broker_url: str) -> None:
    workspace = f"celery-solo-{uuid.uuid4().hex[:8]}"
    with celery_worker(bolt_server, celery_broker_url, "solo", concurrency=1) as live:
        sent = [
            live.client.send_task("examples.ingest", args=(workspace, f"doc-{n}")) for n in range(6)
        ]
        results = wait_all(sent)
        stats = live.call("examples.worker_stats")
        run = live.stop()
    assert all(r["relationships"] == 3 and r["entities_ok"] for r in results)
    assert {r["thread"] for r in results} == {"MainThread"}
    assert len(stats["loops"]) == 1
    assert stats["totals"]["borrows"] == 6
    assert stats["totals"]["created"] <= POOL_MAX_SIZE
    [closed] = run.named("celery.pools_closed")
    assert closed["reason"] == "worker_shutdown"
    assert closed["created"] == closed["closed"] >= 1
    assert run.named("worker.bolt_sockets")[0]["open"] == 0
    assert run.exit_code == 0
    assert run.bad_lines() == []


PARENT_HOOK = '''
"""The worker app, plus a parent process that uses a driver before it forks."""
import json
import os
import sys

from celery import signals

import broker
from examples.celery_app import app  # noqa: F401  (setup() connected first)

KEEP = []  # the parent's driver stays referenced, so its id cannot be reused


async def use_a_driver():
    async with broker.borrow() as conn:
        await conn.driver.execute_query("RETURN 1")
        KEEP.append(conn.driver)
        return id(conn.driver)


@signals.worker_init.connect(weak=False)
def borrow_in_parent(**_):
    line = json.dumps({"pid": os.getpid(), "driver": broker.run(use_a_driver())})
    print("PARENT " + line, file=sys.stderr, flush=True)
'''


@pytest.mark.slow
def test_prefork_children_never_use_the_parents_driver(
    bolt_server: BoltServer, celery_broker_url: str
) -> None:
    with celery_worker(
        bolt_server,
        celery_broker_url,
        "prefork",
        concurrency=2,
        app="prefork_hook",
        modules={"prefork_hook": PARENT_HOOK},
    ) as live:
        sent = [live.client.send_task("examples.probe", args=(f"m{n}",)) for n in range(8)]
        probes = wait_all(sent)
        run = live.stop()
    [parent_line] = [line for line in run.output.splitlines() if line.startswith("PARENT ")]
    parent = json.loads(parent_line.removeprefix("PARENT "))
    assert all(p["ok"] for p in probes)
    children = {p["pid"] for p in probes}
    assert parent["pid"] not in children
    assert parent["driver"] not in {p["driver"] for p in probes}
    for probe in probes:
        assert probe["seen"]["task_id"] == probe["task_id"]
    # Each child closed its own drivers when it ended; the parent closed its one.
    closed = {e["pid"]: e for e in run.named("celery.pools_closed")}
    assert len(run.named("celery.pools_closed")) == len(closed), "one report per process"
    for pid in children:
        assert closed[pid]["reason"] == "worker_process_shutdown"
        assert closed[pid]["created"] == closed[pid]["closed"] >= 1
    assert closed[parent["pid"]]["reason"] == "worker_shutdown"
    assert closed[parent["pid"]]["created"] == closed[parent["pid"]]["closed"] == 1
    sockets = {e["pid"]: e["open"] for e in run.named("worker.bolt_sockets")}
    assert sockets[parent["pid"]] == 0
    assert run.exit_code == 0
    assert run.bad_lines() == []


# -- setup()'s wiring, in this process ---------------------------------------------------


@pytest.fixture
def wired_app(bolt_config: broker.Neo4jConnectionConfig) -> Iterator[Celery]:
    app = Celery("wiring-test", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        result_backend="cache+memory://",
        task_always_eager=False,
        worker_hijack_root_logger=False,
    )
    broker.celery.setup(app, bolt_config.replace(pool_min_size=0, pool_max_size=2))
    try:
        yield app
    finally:
        broker.celery.disconnect()
        runner.shutdown(timeout=10)
        structlog.contextvars.clear_contextvars()


async def query_once() -> int:
    async with broker.borrow() as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS x")
        assert records[0]["x"] == 1
        return id(asyncio.get_running_loop())


def test_worker_start_configures_without_connecting(
    wired_app: Celery, bolt_config: broker.Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    before = open_connections(bolt_port(bolt_server))
    signals.worker_init.send(sender=None)
    current = broker.get_broker()
    assert current.config.uri == bolt_config.uri
    assert current.config.pool_max_size == 2
    assert broker.stats_sync() == {}
    assert open_connections(bolt_port(bolt_server)) == before
    # A second start in the same process keeps the same default broker.
    signals.worker_process_init.send(sender=None)
    assert broker.get_broker() is current


def test_setup_without_config_keeps_a_configured_default(
    bolt_config: broker.Neo4jConnectionConfig,
) -> None:
    app = Celery("wiring-default", set_as_current=False)
    broker.configure(bolt_config.replace(pool_max_size=3))
    broker.celery.setup(app)
    try:
        signals.worker_init.send(sender=None)
        assert broker.get_broker().config.pool_max_size == 3
        assert broker.get_broker().config.uri == bolt_config.uri
    finally:
        broker.celery.disconnect()


def test_prerun_binds_the_task_and_postrun_removes_it(wired_app: Celery) -> None:
    @wired_app.task(name="wiring.noop")
    def noop() -> None:
        return None

    structlog.contextvars.bind_contextvars(request="kept")
    signals.task_prerun.send(sender=noop, task_id="id-1", task=noop, args=(), kwargs={})
    assert structlog.contextvars.get_contextvars() == {
        "request": "kept",
        "task_id": "id-1",
        "task_name": "wiring.noop",
    }
    signals.task_postrun.send(sender=noop, task_id="id-1", task=noop, retval=None, state="SUCCESS")
    assert structlog.contextvars.get_contextvars() == {"request": "kept"}


@pytest.mark.parametrize("signal", ["worker_shutdown", "worker_process_shutdown"])
def test_shutdown_signal_closes_every_pool_in_its_own_loop(
    wired_app: Celery, bolt_server: BoltServer, signal: str
) -> None:
    before = open_connections(bolt_port(bolt_server))
    signals.worker_init.send(sender=None)
    with ThreadPoolExecutor(3) as pool:
        loops = list(pool.map(lambda _: broker.run(query_once()), range(9)))
    assert 1 <= len(set(loops)) <= 3
    created = broker.totals()["created"]
    assert created >= 1
    assert open_connections(bolt_port(bolt_server)) > before

    getattr(signals, signal).send(sender=None)

    assert broker.get_broker().closed
    assert broker.totals()["closed"] == created
    assert broker.stats_sync() == {}
    assert open_connections(bolt_port(bolt_server)) == before


def test_task_decorator_runs_on_the_threads_persistent_loop(wired_app: Celery) -> None:
    @broker.celery.task(wired_app, name="wiring.loop_of")
    async def loop_of(tag: str) -> tuple[str, int]:
        return tag, await query_once()

    first = loop_of.apply(args=("a",)).get()
    second = loop_of.apply(args=("b",)).get()
    assert first[0] == "a" and second[0] == "b"
    assert first[1] == second[1], "both calls ran on this thread's one loop"
    assert loop_of.name == "wiring.loop_of"
    assert broker.totals()["created"] == 1

    with pytest.raises(TypeError, match="async def"):
        broker.celery.task(wired_app)(lambda: None)


def test_in_process_threads_worker(wired_app: Celery) -> None:
    """``celery.contrib.testing``'s worker: no worker_shutdown, so close the pools ourselves."""

    @broker.celery.task(wired_app, name="wiring.where", bind=True)
    async def where(self: Any) -> dict[str, Any]:
        loop = await query_once()
        seen = structlog.contextvars.get_contextvars()
        return {"id": self.request.id, "seen": seen.get("task_id"), "loop": loop}

    with start_worker(wired_app, pool="threads", concurrency=2, perform_ping_check=False):
        results = [where.delay() for _ in range(10)]
        values = [r.get(timeout=30) for r in results]
    assert [v["seen"] for v in values] == [v["id"] for v in values]
    assert 1 <= len({v["loop"] for v in values}) <= 2
    assert broker.totals()["created"] <= 2
    totals = broker.celery.close_pools(timeout=10)
    assert totals["closed"] == totals["created"] >= 1
    assert threading.current_thread().name == "MainThread"


def ready_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"].startswith("celery."):
            events.append(dict(event))
        raise structlog.DropEvent

    structlog.configure(processors=[keep], cache_logger_on_first_use=False)
    return events


@pytest.mark.parametrize("good", [True, False])
def test_ready_check_at_worker_ready_logs_the_result(
    bolt_config: broker.Neo4jConnectionConfig, good: bool
) -> None:
    app = Celery("wiring-ready", set_as_current=False)
    config = bolt_config.replace(pool_min_size=1)
    if not good:
        config = config.replace(password="not-the-password")
    broker.celery.setup(app, config, ready_check=True)
    events = ready_events()
    try:
        signals.worker_init.send(sender=None)
        signals.worker_ready.send(sender=None)
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        broker.celery.disconnect()
    [event] = events
    if good:
        assert event["event"] == "celery.ready" and event["seconds"] >= 0
    else:
        assert event["event"] == "celery.not_ready"
        assert event["error"].startswith("AuthError")
    totals = broker.totals()
    assert totals["created"] == totals["closed"], "the check's own loop closed its pool"


@pytest.mark.parametrize("pool_min_size", [0, 2])
@pytest.mark.parametrize("listening", [True, False], ids=["server", "nothing-listens"])
def test_ready_check_reaches_the_database_whatever_the_minimum(
    bolt_config: broker.Neo4jConnectionConfig,
    bolt_server: BoltServer,
    pool_min_size: int,
    listening: bool,
) -> None:
    """Ready means a driver of this configuration answered, even with no minimum to wait for."""
    config = bolt_config.replace(pool_min_size=pool_min_size, connection_timeout=2.0)
    if not listening:
        [port] = server_module._free_ports(1)  # just handed out and closed: nothing listens
        config = config.replace(uri=f"bolt://127.0.0.1:{port}")
    before = open_connections(bolt_port(bolt_server))
    broker.celery.setup(Celery("wiring-ready-min", set_as_current=False), config)
    events = ready_events()
    try:
        ready = broker.celery.check_ready(timeout=10)
    finally:
        broker.celery.disconnect()
    [event] = events
    totals = broker.totals()
    if listening:
        assert ready and event["event"] == "celery.ready"
        assert totals["created"] >= max(1, pool_min_size), "a driver was made and verified"
    else:
        assert not ready and event["event"] == "celery.not_ready"
        assert event["error"].startswith("ServiceUnavailable"), event
    assert totals["created"] == totals["closed"], "the check's own loop closed its pool"
    assert broker.stats_sync() == {}
    assert open_connections(bolt_port(bolt_server)) == before
