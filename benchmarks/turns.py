"""Loop turns, selector polls and tasks per ``execute_query``, by hand and through the broker.

Usage: ``python -m benchmarks.turns [--queries 400]``; the server as for
``make bench`` (``BROKER_TEST_SERVER``, ``NEO4J_URI``). One loop, one query
at a time on a warm driver, so every count is the query's own. Each count is
the difference of a run of ``queries`` and one of twice as many, divided by
``queries``: start-up and warm-up cancel out. A selector poll is one
``epoll_wait`` system call, whatever the loop does with it.

It also says whether the server sent the ``connection.recv_timeout_seconds``
hint at login: the driver then sets a read timeout on the socket, and every
read goes through its ``wait_for`` shim, which on Python before 3.12 wraps the
read in a task of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import selectors
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import neo4j

from benchmarks.network import local
from broker import Broker, Neo4jConnectionConfig
from broker.testing import server_from_env
from broker.testing.selection import bench_server

QUERY = "RETURN 1 AS one"


class CountingSelector(selectors.EpollSelector):
    """An epoll selector that counts its polls."""

    polls = 0

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        CountingSelector.polls += 1
        return super().select(timeout)


Counts = dict[str, float]


def _counted(job: Callable[[], Coroutine[Any, Any, float]]) -> Counts:
    """Polls, tasks created and CPU seconds of ``job`` in a loop of its own."""
    loop = asyncio.SelectorEventLoop(CountingSelector())
    tasks = 0

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        nonlocal tasks
        tasks += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        before = CountingSelector.polls
        cpu = loop.run_until_complete(job())
        return {"polls": CountingSelector.polls - before, "tasks": tasks, "cpu": cpu}
    finally:
        loop.close()


async def _queries(run: Callable[[], Coroutine[Any, Any, Any]], count: int) -> float:
    started = time.thread_time()
    for _ in range(count):
        await run()
    return time.thread_time() - started


def _by_hand(config: Neo4jConnectionConfig, count: int) -> Callable[[], Coroutine[Any, Any, float]]:
    async def job() -> float:
        async with neo4j.AsyncGraphDatabase.driver(config.uri, **config.driver_kwargs()) as d:
            await d.execute_query(QUERY)
            return await _queries(lambda: d.execute_query(QUERY), count)

    return job


Job = Callable[[], Coroutine[Any, Any, float]]


def _brokered(config: Neo4jConnectionConfig, count: int) -> Job:
    async def one(b: Broker) -> None:
        async with b.borrow() as conn:
            await conn.driver.execute_query(QUERY)

    async def job() -> float:
        b = Broker(config)
        try:
            await one(b)
            return await _queries(lambda: one(b), count)
        finally:
            await asyncio.to_thread(b.close)

    return job


async def read_timeout(config: Neo4jConnectionConfig) -> float | None:
    """The read timeout the driver set on its socket after login (None: no hint)."""
    async with neo4j.AsyncGraphDatabase.driver(config.uri, **config.driver_kwargs()) as d:
        await d.execute_query(QUERY)
        pool: Any = d._pool  # the driver's internals: read for this measurement only
        idle = [c for conns in pool.connections.values() for c in conns]
        timeout: float | None = idle[0].socket.get_read_timeout()
        return timeout


def per_query(make: Callable[[int], Callable[[], Coroutine[Any, Any, float]]], n: int) -> Counts:
    small, large = _counted(make(n)), _counted(make(2 * n))
    return {key: (large[key] - small[key]) / n for key in small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument(
        "--once",
        choices=("hand", "broker"),
        help="one run of one side, nothing else: for strace -c or callgrind, two sizes",
    )
    args = parser.parse_args()
    logging.getLogger("neo4j").setLevel(logging.ERROR)
    external = server_from_env()
    server = external or bench_server().start()
    try:
        config = local(server).config(pool_min_size=0, pool_max_size=1)
        if args.once:
            make = _by_hand if args.once == "hand" else _brokered
            print(_counted(make(config, args.queries)))
            return
        timeout = asyncio.run(read_timeout(config))
        rows = {
            "by hand": per_query(lambda n: _by_hand(config, n), args.queries),
            "broker": per_query(lambda n: _brokered(config, n), args.queries),
        }
    finally:
        if external is None:
            server.stop()
    print(f"Python {sys.version.split()[0]}, neo4j driver {neo4j.__version__}")
    hint = "none" if timeout is None else f"{timeout:g} s"
    print(f"read timeout the driver set from the server's hint: {hint}")
    print(f"{'per execute_query':<12}{'polls':>8}{'tasks':>8}{'CPU µs':>9}")
    for name, got in rows.items():
        print(f"{name:<12}{got['polls']:>8.2f}{got['tasks']:>8.2f}{got['cpu'] * 1e6:>9.0f}")


if __name__ == "__main__":
    main()
