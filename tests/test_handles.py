"""One handle, one driver: handles shared by mistake, and errors in exception groups."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import neo4j
import pytest

from broker import Broker, BrokerError, Connection, Neo4jConnectionConfig
from broker.pooled import is_connection_error as _is_connection_error
from broker.testing import BoltServer
from broker.testing.faults import FaultProxy
from tests.helpers import bolt_port, eventually
from tests.test_logging import capture_structlog

MakeBroker = Callable[..., Broker]


async def _pool(b: Broker) -> dict[str, Any]:
    (entry,) = (await b.stats()).values()
    return entry


async def test_a_handle_awaited_by_two_tasks_at_once(make_broker: MakeBroker) -> None:
    """One task gets the driver, the other a clear error; no slot is lost."""
    b = make_broker(pool_min_size=0, pool_max_size=1, borrow_timeout=5)
    conn = b.borrow()

    async def take() -> Connection:
        return await conn

    results = await asyncio.gather(take(), take(), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert [r for r in results if r is conn] != [] and len(errors) == 1, results
    assert isinstance(errors[0], BrokerError) and "another task" in str(errors[0])
    await conn.driver.execute_query("RETURN 1")
    await conn.release()
    # The pool's only slot is free again: a later borrow does not time out.
    async with b.borrow(timeout=5) as again:
        await again.driver.execute_query("RETURN 1")
    pool = await _pool(b)
    assert pool["in_use"] == 0 and pool["created"] == 1 and pool["borrows"] == 2


async def test_a_handle_entered_by_two_tasks_at_once(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1)
    conn = b.borrow()
    inside = 0

    async def enter() -> None:
        nonlocal inside
        async with conn:
            inside += 1
            await conn.driver.execute_query("RETURN 1")

    results = await asyncio.gather(enter(), enter(), return_exceptions=True)
    assert inside == 1 and [type(r) for r in results].count(BrokerError) == 1, results
    async with b.borrow(timeout=5):
        pass
    assert (await _pool(b))["in_use"] == 0


def test_a_handle_awaited_from_two_loops_at_once(bolt_config: Neo4jConnectionConfig) -> None:
    """Two threads, each in its own loop, race for one handle: exactly one wins, each time."""
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=1, close_timeout=1))
    rounds = 10
    wins: list[str] = []
    errors: list[BaseException] = []

    def contender(conn: Connection, start: threading.Barrier) -> None:
        async def take() -> None:
            start.wait()
            try:
                held = await conn
            except BrokerError as exc:
                errors.append(exc)
                return
            wins.append(threading.current_thread().name)
            await held.release()

        asyncio.run(take())

    for _ in range(rounds):
        conn, start = b.borrow(), threading.Barrier(2)
        threads = [threading.Thread(target=contender, args=(conn, start)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(wins) == rounds and len(errors) == rounds, (wins, errors)
    totals = b.totals()
    assert totals["borrows"] == rounds and totals["created"] == totals["closed"]
    b.close()


def test_two_threads_release_one_handle_at_the_same_moment(
    bolt_config: Neo4jConnectionConfig,
) -> None:
    """Exactly one of them returns the driver, every time."""
    events = capture_structlog()
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=1))
    loop = asyncio.new_event_loop()
    rounds = 300
    handle: list[Connection] = []
    start, done = threading.Barrier(3), threading.Barrier(3)
    failures: list[BaseException] = []

    def releaser() -> None:
        for _ in range(rounds):
            start.wait()
            try:
                handle[0].release_sync()
            except BaseException as exc:
                failures.append(exc)
            done.wait()

    threads = [threading.Thread(target=releaser) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(rounds):
            handle[:] = [loop.run_until_complete(b.borrow(timeout=5))]
            start.wait()
            done.wait()
    finally:
        for thread in threads:
            thread.join(30)
    stats = loop.run_until_complete(b.stats())
    (pool,) = stats.values()
    returns = [e for e in events if e["event"] == "return"]
    assert failures == []
    assert len(returns) == rounds, "one return per handle, never two"
    assert pool["borrows"] == rounds and pool["in_use"] == 0 and pool["created"] == 1
    loop.run_until_complete(b.aclose())
    loop.close()


@pytest.mark.parametrize("depth", [1, 2], ids=["group", "nested-groups"])
async def test_connection_error_inside_an_exception_group_gets_the_driver_checked(
    make_broker: MakeBroker, bolt_server: BoltServer, depth: int
) -> None:
    """A query in a TaskGroup inside ``async with borrow()`` loses its server."""
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        b = make_broker(uri=proxy.uri, pool_min_size=0, pool_max_size=1)

        async def query(conn: Connection, depth: int) -> None:
            if depth > 1:
                async with asyncio.TaskGroup() as inner:
                    inner.create_task(query(conn, depth - 1))
                return
            async with conn.driver.session() as session:
                await session.run("RETURN 1")

        async with b.borrow() as conn:
            await query(conn, 1)  # the driver has a pooled connection now

        async def lose_the_server_in_a_task_group() -> None:
            async with b.borrow() as conn:
                proxy.refuse()
                proxy.reset_all()
                async with asyncio.TaskGroup() as group:
                    group.create_task(query(conn, depth))

        with pytest.raises(BaseExceptionGroup) as caught:
            await lose_the_server_in_a_task_group()
        assert _is_connection_error(caught.value), caught.value
        # The driver was checked before reuse: the server is unreachable, so it
        # failed the check and was discarded instead of going back to the pool.
        await eventually(lambda: b.totals()["discarded"] == 1, what="the driver was checked")


def test_exception_groups_are_searched_recursively() -> None:
    lost = neo4j.exceptions.SessionExpired("gone")
    assert _is_connection_error(ExceptionGroup("a", [ValueError(), ExceptionGroup("b", [lost])]))
    assert not _is_connection_error(ExceptionGroup("a", [ValueError(), KeyError()]))
    assert not _is_connection_error(BaseExceptionGroup("a", [BrokerError(), KeyboardInterrupt()]))
