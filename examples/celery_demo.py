"""A real Celery worker (``-P threads -c 4``) sharing one pool per thread across hundreds of tasks.

What it does:

1. starts the embedded Bolt server (ArcadeDB, in a child process);
2. starts ``celery -A examples.celery_app worker -P threads -c 4`` as a
   subprocess, with the database credentials in its environment and kombu's
   filesystem transport in a temporary directory (``CELERY_BROKER_URL``
   chooses Redis or RabbitMQ instead);
3. sends a few hundred ``examples.ingest`` tasks over several workspaces and
   shows a progress bar while they run;
4. asks the worker for its per-loop pool counters, stops it with a warm
   shutdown (SIGTERM), and prints a summary with a few of the worker's JSON
   log lines;
5. stops the server and removes the temporary directory.

Run: ``make demo`` (or ``python examples/celery_demo.py``).
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery

from broker.testing import EmbeddedServer
from examples.celery_config import DIR_ENV, celery_settings

TASKS = 300
WORKSPACES = 6
CONCURRENCY = 4
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A ``celery worker`` subprocess, stopped (and killed if need be) on exit."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        pool: str = "threads",
        concurrency: int = CONCURRENCY,
        app: str = "examples.celery_app",
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool]
        command += ["-c", str(concurrency), "--loglevel", "INFO"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
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


def worker_env(server: EmbeddedServer, work: Path) -> dict[str, str]:
    """The worker's environment: credentials travel here, never on a command line."""
    username, password = server.auth
    return {
        **os.environ,
        "NEO4J_URI": server.uri,
        "NEO4J_USERNAME": username,
        "NEO4J_PASSWORD": password,
        "NEO4J_DATABASE": server.default_database,
        DIR_ENV: str(work),
        "BROKER_LOG_JSON": str(work / "broker.jsonl"),
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


def print_summary(
    results: list[dict[str, Any]],
    failures: list[str],
    elapsed: float,
    stats: dict[str, Any],
    events: list[dict[str, Any]],
    exit_code: int,
) -> None:
    totals = stats["totals"]
    closed = next((e for e in events if e.get("event") == "celery.pools_closed"), {})
    sockets = next((e for e in events if e.get("event") == "worker.bolt_sockets"), {})
    per_thread = collections.Counter(r["thread"] for r in results)
    created = max(totals["created"], 1)
    rows = [
        ("tasks done", f"{len(results)}"),
        ("tasks failed", f"{len(failures)}"),
        ("time", f"{elapsed:.1f} s ({len(results) / elapsed:.0f} tasks/s)"),
        ("worker threads used", f"{len(per_thread)} (concurrency {CONCURRENCY})"),
        ("borrows", f"{totals['borrows']}"),
        (
            "drivers created",
            f"{totals['created']} ({totals['borrows'] / created:.1f} borrows each)",
        ),
        (
            "drivers closed at shutdown",
            f"{closed.get('closed', '?')} of {closed.get('created', '?')}",
        ),
        ("worker's Bolt sockets after", f"{sockets.get('open', '?')} open"),
        ("worker exit code", f"{exit_code}"),
    ]
    print(
        f"\nCelery worker -P threads -c {CONCURRENCY}, {TASKS} tasks over {WORKSPACES} workspaces\n"
    )
    for name, value in rows:
        print(f"  {name:<28} {value}")

    print(f"\nPools of the worker (pid {stats['pid']}), one per thread, read by a task:\n")
    header = f"  {'loop':<34} {'tasks':>5} {'borrows':>7} {'created':>7} {'total':>5} {'max':>3}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for key, loop in sorted(stats["loops"].items()):
        print(
            f"  {key:<34} {per_thread.get(loop['thread'], 0):>5} {loop['borrows']:>7} "
            f"{loop['created']:>7} {loop['total']:>5} {loop['max_size']:>3}"
        )

    print("\nA few of the worker's JSON log lines (broker events carry the task's id):\n")
    shown: set[str] = set()
    for event in events:
        name = str(event.get("event"))
        if name in shown:
            continue
        if event.get("task_id") or name in ("celery.pools_closed", "worker.bolt_sockets"):
            shown.add(name)
            print("  " + json.dumps(event))
    for failure in failures[:5]:
        print(f"  failed: {failure}")


def run_demo(work: Path) -> int:
    print("Starting the embedded Bolt server (ArcadeDB, in a child process)...", flush=True)
    with EmbeddedServer() as server:
        worker = Worker(worker_env(server, work), work / "worker.log")
        try:
            print(f"Starting celery worker -P threads -c {CONCURRENCY}...", flush=True)
            worker.wait_ready()
            client = Celery("demo-client")
            client.conf.update(celery_settings(work))
            print(f"Sending {TASKS} tasks...", flush=True)
            results, failures, elapsed = run_tasks(client)
            stats = client.send_task("examples.worker_stats").get(timeout=30, interval=0.05)
        except BaseException:
            worker.stop()
            print(f"\nThe worker's log ends with:\n{worker.output()[-3000:]}")
            raise
        print("Stopping the worker (warm shutdown)...", flush=True)
        exit_code = worker.stop()
        events = read_json_lines(work / "broker.jsonl")
        print_summary(results, failures, elapsed, stats, events, exit_code)
    return 0 if not failures and exit_code == 0 else 1


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="broker-celery-demo-"))
    try:
        code = run_demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nServer stopped, worker gone, temporary files removed.")
    return code


if __name__ == "__main__":
    sys.exit(main())
