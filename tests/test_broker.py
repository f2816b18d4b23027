"""The broker against a real Bolt server: loops, reuse, bound, order, timeouts,
cancellation, health, close, stats."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import neo4j
import pytest

import broker
from broker import BorrowTimeout, Broker, BrokerClosed, BrokerError
from broker.testing import BoltServer
from broker.testing.faults import FaultProxy
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually, eventually_sync

MakeBroker = Callable[..., Broker]


async def one(b: Broker) -> dict[str, Any]:
    """This loop's stats entry."""
    stats = await b.stats()
    here = [v for v in stats.values() if v["thread"] == threading.current_thread().name]
    assert len(here) == 1, stats
    return here[0]


async def query(conn: broker.Connection, value: int = 1) -> int:
    records, _, _ = await conn.driver.execute_query("RETURN $v AS v", v=value)
    return int(records[0]["v"])


async def test_many_threads_many_loops_no_cross_loop_error(bolt_config: Any) -> None:
    """N threads x M asyncio.run, each with concurrent borrowers, on one broker."""
    b = Broker(bolt_config.replace(pool_max_size=3, pool_min_size=0))
    errors: list[BaseException] = []
    results: list[int] = []
    lock = threading.Lock()

    async def borrower(i: int) -> int:
        async with b.borrow() as conn:
            return await query(conn, i)

    async def task(seed: int) -> None:
        values = await asyncio.gather(*(borrower(seed * 100 + i) for i in range(8)))
        with lock:
            results.extend(values)

    def thread_main(t: int) -> None:
        try:
            for m in range(3):
                asyncio.run(task(t * 10 + m))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(4)]
    await asyncio.to_thread(lambda: [(t.start(), t.join()) for t in threads])
    assert errors == []
    assert len(results) == 4 * 3 * 8
    assert sorted(results) == sorted(
        (t * 10 + m) * 100 + i for t in range(4) for m in range(3) for i in range(8)
    )
    totals = b.totals()
    assert totals["borrows"] == 96
    assert totals["created"] == totals["closed"], "every loop closed its drivers when it ended"
    assert totals["created"] <= 4 * 3 * 3, "never more than pool_max_size per loop"
    assert b.stats_sync() == {}, "ended loops leave no entry"
    await b.aclose()


async def test_reuse_same_driver_in_one_loop(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0)
    async with b.borrow() as first:
        driver = first.driver
        assert await query(first) == 1
    async with b.borrow() as second:
        assert second.driver is driver
    conn = await b.borrow()
    assert conn.driver is driver
    await conn.release()
    assert (await one(b))["created"] == 1


async def test_bound_holds_and_waiters_are_served_in_order(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=2, pool_min_size=0)
    peak = 0
    order: list[int] = []

    async def borrower(i: int) -> None:
        nonlocal peak
        async with b.borrow() as conn:
            order.append(i)
            stats = await one(b)
            peak = max(peak, stats["in_use"], stats["total"])
            await query(conn, i)
            await asyncio.sleep(0.01)

    held = [await b.borrow(), await b.borrow()]
    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(borrower(i)))
        await asyncio.sleep(0)  # each borrow reaches the mailbox in this order
    await eventually(lambda: len(tasks) == 10)
    stats = await one(b)
    assert stats["waiting"] == 10 and stats["total"] == 2
    for conn in held:
        await conn.release()
    await asyncio.gather(*tasks)
    assert order == list(range(10)), "first come, first served"
    assert peak <= 2
    final = await one(b)
    assert final["created"] == 2 and final["total"] == 2


async def test_timeout_reports_the_pool_and_changes_nothing(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=1, pool_min_size=0)
    held = await b.borrow()
    before = await one(b)
    with pytest.raises(BorrowTimeout) as caught:
        await b.borrow(timeout=0.2)
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert error.pool["in_use"] == 1 and error.pool["max_size"] == 1
    assert "in_use=1" in str(error) and "max_size=1" in str(error)
    after = await one(b)
    assert after["timeouts"] == 1
    for key in ("in_use", "available", "total", "waiting", "created"):
        assert after[key] == before[key], key
    await held.release()
    async with b.borrow(timeout=1) as conn:  # the pool still works
        assert await query(conn) == 1


async def test_cancelled_while_waiting_leaves_no_trace(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=1, pool_min_size=0)
    held = await b.borrow()
    driver = held.driver
    waiter = asyncio.create_task(b.borrow().__aenter__())
    await eventually(lambda: b.actors()[0].snapshot()["waiting"] == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await eventually(lambda: b.actors()[0].snapshot()["waiting"] == 0)
    stats = await one(b)
    assert stats["cancellations"] == 1 and stats["in_use"] == 1 and stats["borrows"] == 1
    await held.release()
    async with b.borrow(timeout=1) as conn:
        assert conn.driver is driver
    assert (await one(b))["borrows"] == 2


async def test_driver_handed_to_a_just_cancelled_waiter_goes_back(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=1, pool_min_size=0)
    held = await b.borrow()
    driver = held.driver
    waiter = asyncio.create_task(b.borrow().__aenter__())
    await eventually(lambda: b.actors()[0].snapshot()["waiting"] == 1)
    # The actor is parked, so the release is handled at once: the driver is
    # handed over before the waiter runs again and learns it is cancelled.
    await held.release()
    assert b.actors()[0].snapshot()["waiting"] == 0, "handed over already"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await eventually(lambda: b.actors()[0].snapshot()["in_use"] == 0)
    stats = await one(b)
    assert stats["borrows"] == 2, "the actor did hand the driver to the waiter"
    assert stats["cancellations"] == 0
    assert stats["available"] == 1 and stats["total"] == 1
    async with b.borrow(timeout=1) as conn:
        assert conn.driver is driver


async def test_cancelled_while_holding_returns_through_context_exit(
    make_broker: MakeBroker,
) -> None:
    b = make_broker(pool_max_size=1, pool_min_size=0)
    inside = asyncio.Event()

    async def holder() -> None:
        async with b.borrow() as conn:
            await query(conn)
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(holder())
    await inside.wait()
    assert (await one(b))["in_use"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: b.actors()[0].snapshot()["available"] == 1)
    assert (await one(b))["in_use"] == 0


async def test_failed_health_check_replaces_the_driver(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    """The first driver goes through a proxy that then dies; the borrower gets a fresh one."""
    host, port = "127.0.0.1", bolt_port(bolt_server)
    made: list[neo4j.AsyncDriver] = []
    with FaultProxy(host, port) as proxy:

        def factory(config: broker.Neo4jConnectionConfig) -> neo4j.AsyncDriver:
            uri = proxy.uri if not made else config.uri
            made.append(neo4j.AsyncGraphDatabase.driver(uri, **config.driver_kwargs()))
            return made[-1]

        b = make_broker(
            pool_max_size=1, pool_min_size=0, health_check_interval=0.1, driver_factory=factory
        )
        async with b.borrow() as conn:
            first = conn.driver
            assert await query(conn) == 1
        proxy.refuse()
        proxy.reset_all()
        await asyncio.sleep(0.15)
        async with b.borrow(timeout=10) as conn:
            assert conn.driver is not first
            assert await query(conn, 2) == 2
        stats = await one(b)
        assert stats["discarded"] == 1 and stats["errors"] == 1
        assert stats["created"] == 2 and stats["total"] == 1


async def test_healthy_idle_driver_passes_its_check_and_is_reused(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0, health_check_interval=0.05)
    async with b.borrow() as conn:
        driver = conn.driver
    await asyncio.sleep(0.1)
    async with b.borrow() as conn:
        assert conn.driver is driver
    stats = await one(b)
    assert stats["created"] == 1 and stats["discarded"] == 0


async def test_close_from_another_thread(make_broker: MakeBroker, bolt_server: BoltServer) -> None:
    b = make_broker(pool_max_size=2, pool_min_size=0)
    port = bolt_port(bolt_server)
    baseline = open_connections(port)
    held = await b.borrow()
    async with b.borrow():
        pass
    assert await query(held) == 1
    waiter = asyncio.create_task(b.borrow(timeout=30).__aenter__())
    third = asyncio.create_task(b.borrow(timeout=30).__aenter__())
    await eventually(lambda: b.actors()[0].snapshot()["waiting"] == 1)

    closer = threading.Thread(target=b.close, kwargs={"timeout": 5})
    closer.start()
    results = await asyncio.gather(waiter, third, return_exceptions=True)
    # One waiter got the idle driver before the close; the other is refused.
    refused = [r for r in results if isinstance(r, BrokerClosed)]
    assert len(refused) == 1, results
    for r in results:
        if isinstance(r, broker.Connection):
            await r.release()
    assert held.driver is not None  # still usable until it is returned
    await held.release()
    await asyncio.to_thread(closer.join)
    await eventually(lambda: b.actors() == [], what="actor stopped")
    with pytest.raises(BrokerClosed):
        await b.borrow()
    assert b.totals()["closed"] == b.totals()["created"] == 2
    await eventually(lambda: open_connections(port) == baseline, what="sockets closed")


async def test_stats_return_to_baseline_after_load(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=4, pool_min_size=1)

    async def work(i: int) -> int:
        async with b.borrow() as conn:
            return await query(conn, i)

    assert sum(await asyncio.gather(*(work(i) for i in range(200)))) == sum(range(200))
    stats = await one(b)
    assert stats["in_use"] == 0 and stats["waiting"] == 0 and stats["creating"] == 0
    assert stats["available"] == stats["total"] <= 4
    assert stats["borrows"] == 200
    assert stats["created"] - stats["closed"] == stats["total"]
    for key in ("available", "in_use", "total", "max_size"):  # the seed's keys
        assert key in stats


async def test_minimum_size_is_created_in_the_background(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=4, pool_min_size=3)
    async with b.borrow():
        pass
    await eventually(lambda: b.actors()[0].snapshot()["available"] == 3, timeout=5)
    stats = await one(b)
    assert stats["total"] == 3 and stats["created"] == 3


async def test_idle_drivers_above_the_minimum_are_closed(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=3, pool_min_size=1, max_idle_time=0.2)
    held = [await b.borrow() for _ in range(3)]
    for conn in held:
        await conn.release()
    actor = b.actors()[0]
    # total drops when a close starts; closed counts when it has finished.
    await eventually(lambda: actor.snapshot()["closed"] == 2, timeout=5)
    stats = await one(b)
    assert stats["total"] == 1 and stats["available"] == 1


async def test_old_drivers_are_closed_on_return(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=2, pool_min_size=0, max_lifetime=0.2, max_idle_time=None)
    conn = await b.borrow()
    first = conn.driver
    await asyncio.sleep(0.25)
    await conn.release()
    async with b.borrow() as again:
        assert again.driver is not first
    actor = b.actors()[0]
    await eventually(lambda: actor.snapshot()["closed"] == 1, timeout=5)
    assert (await one(b))["created"] == 2


async def test_wrong_password_reaches_the_borrower_and_frees_the_slot(
    make_broker: MakeBroker,
) -> None:
    b = make_broker(password="definitely-wrong", pool_max_size=1, pool_min_size=0)
    for _ in range(2):  # the slot is free again after each failure
        with pytest.raises(neo4j.exceptions.AuthError):
            await b.borrow(timeout=20)
    stats = await one(b)
    assert stats["total"] == 0 and stats["errors"] == 2 and stats["waiting"] == 0


async def test_unreachable_server_fails_promptly(make_broker: MakeBroker) -> None:
    with FaultProxy("127.0.0.1", 9) as proxy:  # nothing listens on the discard port
        proxy.refuse()
        b = make_broker(uri=proxy.uri, pool_min_size=0, connection_timeout=2.0)
        with pytest.raises(neo4j.exceptions.ServiceUnavailable):
            await asyncio.wait_for(b.borrow(timeout=20), 10)
        assert (await one(b))["total"] == 0


async def test_handle_rules(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0)
    other = make_broker(pool_min_size=0)
    conn = b.borrow()
    with pytest.raises(BrokerError, match="not been borrowed yet"):
        _ = conn.driver
    await conn
    driver = await conn.get_driver()
    assert driver is conn.driver
    with pytest.raises(BrokerError, match="another broker"):
        await other.release(conn)
    await b.release(conn)
    await conn.release()  # twice: harmless
    conn.release_sync()
    assert conn.released
    with pytest.raises(BrokerError, match="was released"):
        _ = conn.driver
    with pytest.raises(BrokerError, match="already borrowed once"):
        await conn
    stats = await one(b)
    assert stats["in_use"] == 0 and stats["available"] == 1


async def test_release_from_another_thread_is_routed_to_the_owner(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0)
    conn = await b.borrow()
    await asyncio.to_thread(conn.release_sync)
    await eventually(lambda: b.actors()[0].snapshot()["available"] == 1)

    conn = await b.borrow()
    done = threading.Event()

    def other_loop() -> None:
        asyncio.run(conn.release())
        done.set()

    threading.Thread(target=other_loop).start()
    await asyncio.to_thread(done.wait, 10)
    await eventually(lambda: b.actors()[0].snapshot()["available"] == 1)
    assert (await one(b))["in_use"] == 0


async def test_stats_sync_sees_every_loop_and_reports_unresponsive(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0)
    ready, release = threading.Event(), threading.Event()

    def parked_thread() -> None:
        async def main() -> None:
            async with b.borrow():
                ready.set()
                # Block this loop's thread: its actor cannot answer.
                release.wait(10)

        asyncio.run(main())

    thread = threading.Thread(target=parked_thread, name="busy-thread")
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    async with b.borrow():
        stats = await asyncio.to_thread(b.stats_sync, 0.2)
        assert len(stats) == 2
        mine = next(v for v in stats.values() if v["thread"] == threading.current_thread().name)
        busy = next(v for v in stats.values() if v["thread"] == "busy-thread")
        assert mine["responsive"] and mine["in_use"] == 1
        assert busy["responsive"] is False and busy["in_use"] == 1
    release.set()
    await asyncio.to_thread(thread.join)
    eventually_sync(lambda: len(b.stats_sync()) == 1)


async def test_workspace_database_is_prepared_once_per_broker(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    b = make_broker(pool_min_size=0)
    calls: list[str] = []
    real = b.workspaces.preparer

    async def counting(driver: neo4j.AsyncDriver, workspace: str) -> str:
        calls.append(workspace)
        await asyncio.sleep(0.05)
        return await real(driver, workspace)

    b.workspaces.preparer = counting

    async def prepare() -> str:
        async with b.borrow() as conn:
            return await conn.prepare_database("ws-1")

    names = await asyncio.gather(*(prepare() for _ in range(5)))
    assert len(set(names)) == 1 and calls == ["ws-1"], "concurrent callers share one run"
    database = names[0]
    # Another loop, another thread: still cached.
    assert await asyncio.to_thread(lambda: asyncio.run(prepare())) == database
    assert calls == ["ws-1"]
    async with b.borrow() as conn:
        records, _, _ = await conn.driver.execute_query(
            "SHOW INDEXES YIELD labelsOrTypes, properties", database_=database
        )
    assert any(r["labelsOrTypes"] == ["base"] and r["properties"] == ["entity_id"] for r in records)


async def test_failed_preparation_is_not_cached(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0)
    attempts = 0
    real = b.workspaces.preparer

    async def flaky(driver: neo4j.AsyncDriver, workspace: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise neo4j.exceptions.TransientError("try again")
        return await real(driver, workspace)

    b.workspaces.preparer = flaky
    async with b.borrow() as conn:
        with pytest.raises(neo4j.exceptions.TransientError):
            await conn.prepare_database("ws-flaky")
        assert await conn.prepare_database("ws-flaky")
    assert attempts == 2


async def test_loop_end_closes_every_driver_in_its_own_loop(
    bolt_config: Any, bolt_server: BoltServer
) -> None:
    port = bolt_port(bolt_server)
    b = Broker(bolt_config.replace(pool_max_size=3, pool_min_size=0))
    before = open_connections(port)

    async def main() -> None:
        held = await b.borrow()  # never released: abandoned when the loop ends
        await query(held)
        async with b.borrow() as conn:
            await query(conn)

    await asyncio.to_thread(asyncio.run, main())
    totals = b.totals()
    assert totals["created"] == 2 and totals["closed"] == 2
    assert open_connections(port) == before
    b.close()


async def test_close_deadline_closes_drivers_still_in_use(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    b = make_broker(pool_min_size=0)
    held = await b.borrow()
    assert await query(held) == 1
    await b.aclose(timeout=0.2)
    assert held.driver._closed, "closed at the deadline although never returned"  # type: ignore[attr-defined]
    await held.release()  # late, harmless
    assert b.totals()["closed"] == b.totals()["created"] == 1


async def test_cancel_during_connect_keeps_the_slot(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        proxy.delay_handshake(1.0)
        b = make_broker(uri=proxy.uri, pool_max_size=1, pool_min_size=0)
        task = asyncio.create_task(b.borrow().__aenter__())
        await eventually(lambda: bool(b.actors()))
        actor = b.actors()[0]
        await eventually(lambda: actor.snapshot()["creating"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: actor.snapshot()["available"] == 1, timeout=5)
        async with b.borrow(timeout=1) as conn:  # the slot was not lost
            assert await query(conn) == 1
        assert (await one(b))["created"] == 1


async def test_failed_check_and_no_new_driver_gives_the_error(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        b = make_broker(
            uri=proxy.uri,
            pool_max_size=1,
            pool_min_size=0,
            health_check_interval=0.05,
            connection_timeout=1.0,
            connection_acquisition_timeout=2.0,
        )
        async with b.borrow() as conn:
            assert await query(conn) == 1
        proxy.refuse()
        proxy.reset_all()
        await asyncio.sleep(0.1)
        with pytest.raises(neo4j.exceptions.ServiceUnavailable):
            await b.borrow(timeout=10)
        stats = await one(b)
        assert stats["discarded"] == 1 and stats["total"] == 0


async def test_driver_returned_after_a_connection_error_is_checked(
    make_broker: MakeBroker,
) -> None:
    checks = 0

    def counting_factory(config: broker.Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        driver = neo4j.AsyncGraphDatabase.driver(config.uri, **config.driver_kwargs())
        verify = driver.verify_connectivity

        async def counted(**kwargs: Any) -> None:
            nonlocal checks
            checks += 1
            await verify(**kwargs)

        driver.verify_connectivity = counted  # type: ignore[method-assign]
        return driver

    b = make_broker(
        pool_max_size=1,
        pool_min_size=0,
        health_check_interval=None,
        driver_factory=counting_factory,
    )
    seen: list[neo4j.AsyncDriver] = []

    async def fail_inside() -> None:
        async with b.borrow() as conn:
            seen.append(conn.driver)
            raise neo4j.exceptions.SessionExpired("the connection dropped")

    with pytest.raises(neo4j.exceptions.SessionExpired):
        await fail_inside()
    assert checks == 1, "verified once, when it was created"
    actor = b.actors()[0]
    await eventually(lambda: actor.snapshot()["available"] == 1)
    assert checks == 2, "verified again after the connection error"
    async with b.borrow() as conn:
        assert conn.driver is seen[0], "the check passed: the same driver is reused"
    assert (await one(b))["discarded"] == 0


async def test_timeout_zero_serves_an_idle_driver_or_fails_at_once(
    make_broker: MakeBroker,
) -> None:
    b = make_broker(pool_max_size=1, pool_min_size=0)
    held = await b.borrow()
    started = asyncio.get_running_loop().time()
    with pytest.raises(BorrowTimeout):
        await b.borrow(timeout=0)
    assert asyncio.get_running_loop().time() - started < 0.5
    await held.release()
    async with b.borrow(timeout=0) as conn:
        assert await query(conn) == 1


def test_totals_never_go_back_while_loops_end(bolt_config: Any) -> None:
    """Counters summed over every loop, read while loops end: each reading is
    at least the one before it (Prometheus reads a dip as a counter reset)."""
    b = Broker(bolt_config.replace(pool_min_size=0))
    loops = 100
    stop = threading.Event()
    dips: list[tuple[str, float, float]] = []
    readings = 0

    def watch() -> None:
        nonlocal readings
        last = {"borrows": 0.0, "created": 0.0, "waits": 0.0}
        while not stop.is_set():
            totals = b.totals()
            now = {
                "borrows": float(totals["borrows"]),
                "created": float(totals["created"]),
                "waits": float(b.histograms()["borrow_wait"].count),
            }
            for name, value in now.items():
                if value < last[name]:
                    dips.append((name, last[name], value))
            last = now
            readings += 1

    async def one_borrow() -> None:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(loops):
            asyncio.run(one_borrow())
    finally:
        stop.set()
        watcher.join()
        b.close()
    assert b.totals()["borrows"] == loops
    assert readings > loops, "the watcher kept up with the loops"
    assert dips == [], f"{len(dips)} readings went back, first {dips[:3]}"


async def test_a_borrow_that_finds_a_driver_idle_takes_no_trip_through_the_loop(
    make_broker: MakeBroker,
) -> None:
    """The actor is parked: the borrower's own post drains the mailbox at once."""
    b = make_broker(pool_min_size=0, pool_max_size=2)
    async with b.borrow() as first:
        await query(first)
    await one(b)  # the actor has handled everything and parked
    went_round: list[int] = []
    asyncio.get_running_loop().call_soon(went_round.append, 1)
    conn = await b.borrow()
    driver = conn.driver
    await conn.release()
    assert went_round == [], "the borrow or the return waited for a loop iteration"
    stats = await one(b)
    assert stats["borrows"] == 2 and stats["available"] == 1 and stats["in_use"] == 0
    async with b.borrow() as again:
        assert again.driver is driver
        await query(again)
