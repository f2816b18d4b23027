"""The broker against what a user reaches for first: one sync driver shared by
the whole process, each query sent to a thread with ``asyncio.to_thread``.

The load is Celery-shaped: 4 worker threads each run tasks one after another,
and each task runs 8 queries, 4 at a time. Three cases, interleaved round by
round on one server, medians:

- *broker*: ``broker.run`` (a persistent loop per thread), a borrow per query;
- *sync rival*: one ``neo4j.GraphDatabase.driver`` for the process, every
  query ``await asyncio.to_thread(driver.execute_query, ...)``, with
  ``asyncio.run`` per task (as Celery runs a coroutine; the loop's executor
  threads are made again for every task), and, as its best case, on the
  broker's persistent loops (the executor threads kept);
- *driver per task*: ``asyncio.run`` per task, a new ``AsyncDriver`` in it.

Client CPU is the whole process's (``time.process_time``: worker threads, the
rival's executor threads, everything but the server and the TLS front, which
run in processes of their own), per task.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import neo4j

import broker
from benchmarks.network import Network, can_front, local, tls
from benchmarks.scenarios import Check, Result, Row
from broker import Broker, runner
from broker.testing import BoltServer

THREADS, IN_FLIGHT, QUERIES = 4, 4, 8
QUERY = "RETURN 1 AS one"
BROKER, PER_TASK = "broker", "driver per task"
SYNC = "sync rival, asyncio.run per task"
SYNC_LOOP = "sync rival, a persistent loop per thread"


async def _fan_out(one: Callable[[], Awaitable[int]]) -> int:
    """``QUERIES`` queries, ``IN_FLIGHT`` at a time; the sum of their results."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated() -> int:
        async with gate:
            return await one()

    return sum(await asyncio.gather(*(gated() for _ in range(QUERIES))))


async def _broker_task(b: Broker) -> int:
    async def one() -> int:
        async with b.borrow() as conn:
            records, _, _ = await conn.driver.execute_query(QUERY)
        return int(records[0]["one"])

    return await _fan_out(one)


async def _sync_task(driver: neo4j.Driver) -> int:
    async def one() -> int:
        records, _, _ = await asyncio.to_thread(driver.execute_query, QUERY)
        return int(records[0]["one"])

    return await _fan_out(one)


async def _per_task(uri: str, kwargs: dict[str, Any]) -> int:
    async with neo4j.AsyncGraphDatabase.driver(uri, **kwargs) as driver:

        async def one() -> int:
            records, _, _ = await driver.execute_query(QUERY)
            return int(records[0]["one"])

        return await _fan_out(one)


def _timed(tasks: int, one: Callable[[], int], warm: bool) -> tuple[int, float, float]:
    """``tasks`` tasks on each of ``THREADS`` threads: queries done, seconds, CPU seconds.

    ``warm``: each thread runs one task first, untimed (its loop, pool and sockets).
    """
    with ThreadPoolExecutor(THREADS) as pool:
        if warm:
            barrier = threading.Barrier(THREADS)

            def first() -> int:
                barrier.wait()  # one warm task on every thread
                return one()

            list(pool.map(lambda _: first(), range(THREADS)))
        started, cpu = time.perf_counter(), time.process_time()
        done = sum(pool.map(lambda _: one(), range(THREADS * tasks)))
        return done, time.perf_counter() - started, time.process_time() - cpu


def _cases(network: Network, tasks: int) -> dict[str, Callable[[], tuple[int, float, float]]]:
    config = network.config(pool_min_size=0, pool_max_size=IN_FLIGHT)
    kwargs = config.driver_kwargs()

    def brokered() -> tuple[int, float, float]:
        b = Broker(config)
        try:
            return _timed(tasks, lambda: broker.run(_broker_task(b)), True)
        finally:
            runner.shutdown()
            b.close()

    def rival(run: Callable[[Coroutine[Any, Any, int]], int]) -> tuple[int, float, float]:
        with neo4j.GraphDatabase.driver(config.uri, **kwargs) as driver:
            try:
                return _timed(tasks, lambda: run(_sync_task(driver)), True)
            finally:
                runner.shutdown()

    def per_task() -> tuple[int, float, float]:
        return _timed(tasks, lambda: asyncio.run(_per_task(config.uri, kwargs)), False)

    return {
        BROKER: brokered,
        SYNC: lambda: rival(asyncio.run),
        SYNC_LOOP: lambda: rival(broker.run),
        PER_TASK: per_task,
    }


def _measure(result: Result, network: Network, tasks: int, rounds: int) -> dict[str, Any]:
    """Every case ``rounds`` times, interleaved; rows, and rates and CPU by case."""
    cases = _cases(network, tasks)
    samples: dict[str, list[tuple[int, float, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            samples[name].append(case())
    expected = THREADS * tasks * QUERIES
    rate, cpu = {}, {}
    for name, got in samples.items():
        assert all(done == expected for done, _, _ in got), (name, got)
        rate[name] = statistics.median(THREADS * tasks / s for _, s, _ in got)
        cpu[name] = statistics.median(c / (THREADS * tasks) for _, _, c in got) * 1000
        label = f"{network.name}, {name}"
        result.rows += [
            Row("rival", label, rate[name], "tasks/s", expected),
            Row("rival", f"{label}, client CPU", cpu[name], "ms/task", expected),
        ]
    return {"rate": rate, "cpu": cpu}


def _check(result: Result, name: str, ratio: float, target: float | None) -> None:
    if target is None:
        result.checks.append(Check(name, ratio, "(reported)", True))
    else:
        result.checks.append(Check(name, ratio, f">= {target:g}", ratio >= target))


def rival(server: BoltServer, quick: bool) -> Result:
    """Broker ÷ the shared sync driver and ÷ a driver per task, locally and over TLS."""
    result = Result()
    rounds = 1 if quick else 3
    network = local(server)
    _ratios(result, network, _measure(result, network, 4 if quick else 40, rounds), False)
    if can_front(server):
        with tls(server) as network:
            _ratios(result, network, _measure(result, network, 3 if quick else 20, rounds), True)
    return result


def _ratios(result: Result, network: Network, got: dict[str, Any], remote: bool) -> None:
    rate, cpu, name = got["rate"], got["cpu"], network.name
    _check(
        result, f"rival, {name}: broker / sync rival, throughput", rate[BROKER] / rate[SYNC], 1.5
    )
    _check(result, f"rival, {name}: sync rival / broker, client CPU", cpu[SYNC] / cpu[BROKER], 2)
    _check(
        result,
        f"rival, {name}: broker / sync rival on persistent loops, throughput",
        rate[BROKER] / rate[SYNC_LOOP],
        None,
    )
    _check(
        result,
        f"rival, {name}: sync rival on persistent loops / broker, client CPU",
        cpu[SYNC_LOOP] / cpu[BROKER],
        None,
    )
    _check(
        result,
        f"rival, {name}: broker / driver per task, throughput",
        rate[BROKER] / rate[PER_TASK],
        3 if remote else None,
    )
    _check(
        result,
        f"rival, {name}: driver per task / broker, client CPU",
        cpu[PER_TASK] / cpu[BROKER],
        None,
    )
