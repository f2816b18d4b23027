"""The ways users really drive loops: uvloop, eager tasks, run_until_complete, run_forever.

Each runs borrowers against the real server and checks that nothing is lost:
every borrow served, every driver closed in its own loop when the loop ends
(or the pool is closed), no Bolt socket left open.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker import Broker, Connection, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually_sync

pytestmark = pytest.mark.loops

BORROWERS = 5


async def workload(b: Broker, borrowers: int = BORROWERS, rounds: int = 3) -> int:
    """Concurrent borrowers, each running a query per round; the number of queries run."""

    async def borrower(i: int) -> int:
        done = 0
        for r in range(rounds):
            async with b.borrow() as conn:
                records, _, _ = await conn.driver.execute_query("RETURN $v AS v", v=i * 10 + r)
                assert records[0]["v"] == i * 10 + r
                done += 1
        return done

    return sum(await asyncio.gather(*(borrower(i) for i in range(borrowers))))


def assert_all_closed(b: Broker, server: BoltServer) -> None:
    totals = b.totals()
    assert totals["created"] == totals["closed"] and totals["created"] > 0, totals
    assert b.stats_sync() == {}, "no loop left behind"
    eventually_sync(lambda: open_connections(bolt_port(server)) == 0, what="no socket open")


def _uvloop() -> Any:
    return pytest.importorskip("uvloop")


def test_uvloop_loop_factory(bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer) -> None:
    uvloop = _uvloop()
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    for _ in range(3):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(workload(b)) == BORROWERS * 3
            assert isinstance(runner.get_loop(), uvloop.Loop)
    if sys.version_info >= (3, 12):
        assert asyncio.run(workload(b), loop_factory=uvloop.new_event_loop) == BORROWERS * 3
    assert_all_closed(b, bolt_server)
    b.close()


def test_uvloop_installed_as_the_policy(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    uvloop = _uvloop()
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # what uvloop.install() does
    try:

        async def on_uvloop() -> int:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            return await workload(b)

        for _ in range(3):
            assert asyncio.run(on_uvloop()) == BORROWERS * 3
    finally:
        asyncio.set_event_loop_policy(previous)
    assert_all_closed(b, bolt_server)
    b.close()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager_task_factory is new in 3.12")
def test_eager_task_factory(bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer) -> None:
    """Every actor job starts synchronously inside create_task, mid-way through a message."""
    b = Broker(bolt_config.replace(pool_min_size=1, pool_max_size=2, max_idle_time=0.2))

    async def eager() -> int:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        done = await workload(b, borrowers=8)
        cancelled = [asyncio.create_task(workload(b, borrowers=1)) for _ in range(4)]
        await asyncio.sleep(0)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        await asyncio.sleep(0.5)  # maintenance: min size refill, idle drivers closed
        return done + await workload(b)

    for _ in range(3):
        assert asyncio.run(eager()) == 8 * 3 + BORROWERS * 3
    assert_all_closed(b, bolt_server)
    b.close()


def test_run_until_complete_many_times_then_close_without_shutdown_asyncgens(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    """One loop, one pool, reused across runs; closed with aclose() and loop.close() only."""
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    loop = asyncio.new_event_loop()
    try:
        for _ in range(30):
            assert loop.run_until_complete(workload(b, rounds=1)) == BORROWERS
        (pool,) = loop.run_until_complete(b.stats()).values()
        assert pool["created"] <= 2 and pool["borrows"] == 30 * BORROWERS
        loop.run_until_complete(b.aclose())
    finally:
        loop.close()
    assert_all_closed(b, bolt_server)


def test_run_forever_in_a_thread_fed_from_other_threads(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    """The bridge from sync frameworks: run_coroutine_threadsafe, and release_sync from a thread."""
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=3))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="loop-owner")
    thread.start()

    def submit(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    async def borrow_only() -> Connection:
        return await b.borrow()

    def sync_caller(i: int) -> int:
        total = submit(workload(b, borrowers=2, rounds=2))
        conn = submit(borrow_only())  # borrowed in the loop, held by this sync thread
        submit(conn.driver.execute_query("RETURN 1"))
        conn.release_sync()  # from a thread with no loop at all
        return int(total) + 1

    try:
        with ThreadPoolExecutor(6) as callers:
            results = list(callers.map(sync_caller, range(30)))
        assert results == [5] * 30
        stats = submit(b.stats())
        (pool,) = stats.values()
        assert pool["in_use"] == 0 and pool["total"] <= 3
        assert pool["borrows"] == 30 * 5
        submit(b.aclose())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    assert_all_closed(b, bolt_server)
