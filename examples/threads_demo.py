"""Many threads, many event loops, one broker.

Starts the embedded Bolt server, then runs 4 threads that each call
``asyncio.run`` 3 times; every run has 8 concurrent tasks that borrow a
driver, prepare their workspace's database, write and read back a node.
Prints each loop's pool counters (taken just before its loop ended), the
totals, and a few of the broker's structured log lines as JSON.

Run: ``make demo-threads`` (or ``python examples/threads_demo.py``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from typing import Any

import structlog

import broker
from broker.testing import EmbeddedServer

THREADS, RUNS, TASKS = 4, 3, 8


def capture_broker_logs() -> io.StringIO:
    """Route the broker's events, as JSON lines, into a buffer we print later."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.JSONRenderer(),
            ]
        )
    )
    logger = logging.getLogger("broker")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return stream


async def task(run: str, i: int) -> int:
    workspace = f"demo-{run.split('/')[0]}"
    async with broker.borrow() as conn:
        database = await conn.prepare_database(workspace)
        label = broker.quote_identifier(workspace)
        records, _, _ = await conn.driver.execute_query(
            f"CREATE (n:{label} {{entity_id: $id}}) RETURN n.entity_id AS id",
            id=f"{run}-{i}",
            database_=database,
        )
        return 1 if records[0]["id"] == f"{run}-{i}" else 0


async def one_run(name: str, report: list[dict[str, Any]]) -> None:
    done = sum(await asyncio.gather(*(task(name, i) for i in range(TASKS))))
    stats = await broker.stats()
    mine = next(v for v in stats.values() if v["thread"] == threading.current_thread().name)
    report.append({"run": name, "tasks_ok": done, **mine})


def main() -> None:
    logs = capture_broker_logs()
    print("Starting the embedded Bolt server (ArcadeDB, in a child process)...")
    with EmbeddedServer() as server:
        username, password = server.auth
        broker.configure(
            broker.Neo4jConnectionConfig(
                uri=server.uri, username=username, password=password, pool_max_size=4
            )
        )
        report: list[dict[str, Any]] = []
        lock = threading.Lock()

        def thread_main(t: int) -> None:
            for r in range(RUNS):
                rows: list[dict[str, Any]] = []
                asyncio.run(one_run(f"t{t}/run{r}", rows))
                with lock:
                    report.extend(rows)

        threads = [
            threading.Thread(target=thread_main, args=(t,), name=f"worker-{t}")
            for t in range(THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        print(f"\n{THREADS} threads x {RUNS} asyncio.run() x {TASKS} concurrent tasks\n")
        header = (
            f"{'loop':<24} {'tasks ok':>8} {'borrows':>7} {'created':>7} {'total':>5} {'max':>3}"
        )
        print(header)
        print("-" * len(header))
        for row in sorted(report, key=lambda r: (r["thread"], int(r["loop"].rsplit("-", 1)[1]))):
            print(
                f"{row['loop']:<24} {row['tasks_ok']:>8} {row['borrows']:>7} "
                f"{row['created']:>7} {row['total']:>5} {row['max_size']:>3}"
            )
        totals = broker.totals()
        print(
            f"\nTotals: {totals['borrows']} borrows, {totals['created']} drivers created, "
            f"{totals['closed']} closed (each loop closed its own drivers when it ended)."
        )
        print(f"Live loops now: {len(broker.stats_sync())}")
        broker.close()

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    print(f"\n{len(lines)} structured log lines; a few of them:")
    shown = set()
    for line in lines:
        if line["event"] not in shown:
            shown.add(line["event"])
            print("  " + json.dumps(line))
    print("\nServer stopped; nothing left running.")


if __name__ == "__main__":
    main()
