"""broker.run: a persistent loop per thread, fresh context per call, clean shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import broker
from broker import runner
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually_sync

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@pytest.fixture
def clean_runner() -> Any:
    yield
    runner.shutdown(timeout=10)


async def driver_id(b: broker.Broker) -> int:
    async with b.borrow() as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS x")
        assert records[0]["x"] == 1
        return id(conn.driver)


def test_one_loop_and_one_pool_per_thread(
    bolt_config: broker.Neo4jConnectionConfig, bolt_server: BoltServer, clean_runner: Any
) -> None:
    b = broker.Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: broker.run(driver_id(b)), range(40)))
    # Four threads, one driver each, reused across all their calls.
    assert len(set(ids)) <= 4
    assert b.totals()["created"] <= 4 and b.totals()["borrows"] == 40
    assert len(b.stats_sync()) <= 4
    runner.shutdown(timeout=10)
    assert b.stats_sync() == {}, "every thread's loop closed its pool"
    assert b.totals()["closed"] == b.totals()["created"]
    eventually_sync(lambda: open_connections(bolt_port(bolt_server)) == 0)
    b.close()


def test_each_call_gets_a_fresh_copy_of_the_callers_context(clean_runner: Any) -> None:
    async def read_then_set(value: str) -> str:
        seen = request_id.get()
        request_id.set(value)
        return seen

    assert broker.run(read_then_set("first")) == "-"
    assert broker.run(read_then_set("second")) == "-", "nothing leaks into the next call"
    token = request_id.set("caller's")
    try:
        assert broker.run(read_then_set("third")) == "caller's"
    finally:
        request_id.reset(token)
    assert request_id.get() == "-"


def test_same_loop_across_calls(clean_runner: Any) -> None:
    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    assert broker.run(loop_id()) == broker.run(loop_id())


async def test_clear_error_inside_a_running_loop() -> None:
    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError, match="await the coroutine instead"):
        broker.run(nothing())


def test_shutdown_waits_for_a_busy_thread(
    bolt_config: broker.Neo4jConnectionConfig, clean_runner: Any
) -> None:
    b = broker.Broker(bolt_config.replace(pool_min_size=0))
    started, release = threading.Event(), threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def busy() -> int:
        loops.append(asyncio.get_running_loop())
        async with b.borrow():
            started.set()
            await asyncio.to_thread(release.wait, 10)
        return 1

    thread = threading.Thread(target=lambda: broker.run(busy()))
    thread.start()
    started.wait(10)
    threading.Timer(0.3, release.set).start()
    runner.shutdown(timeout=10)
    thread.join(10)
    assert loops[0].is_closed(), "the busy thread closed its loop after its call"
    assert b.totals()["closed"] == b.totals()["created"] == 1
    b.close()


def test_loops_of_ended_threads_are_closed(
    bolt_config: broker.Neo4jConnectionConfig, clean_runner: Any
) -> None:
    b = broker.Broker(bolt_config.replace(pool_min_size=0))
    loops: list[asyncio.AbstractEventLoop] = []

    async def remember() -> None:
        loops.append(asyncio.get_running_loop())
        await driver_id(b)

    thread = threading.Thread(target=lambda: broker.run(remember()))
    thread.start()
    thread.join()
    assert not loops[0].is_closed()
    # The next thread to start a loop closes the dead thread's one.
    other = threading.Thread(target=lambda: broker.run(remember()))
    other.start()
    other.join()
    assert loops[0].is_closed()
    assert b.totals()["closed"] >= 1
    b.close()
