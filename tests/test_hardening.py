"""What a second round of attempts to break the broker found, each against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import neo4j
import pytest

import broker
import broker.broker
from broker import Broker
from tests.helpers import eventually

pytestmark = pytest.mark.hardening

MakeBroker = Callable[..., Broker]


async def query(conn: broker.Connection) -> int:
    records, _, _ = await conn.driver.execute_query("RETURN 1 AS v")
    return int(records[0]["v"])


async def test_cancelling_every_other_task_leaves_the_loop_a_working_pool(
    make_broker: MakeBroker,
) -> None:
    """A graceful shutdown's idiom (cancel every task but mine, gather them)
    also cancels the actor; the loop goes on, and so must its pool."""
    b = make_broker(pool_min_size=1, pool_max_size=2)
    async with b.borrow() as conn:
        assert await query(conn) == 1
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    assert others, "the actor is a task of this loop"
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    assert not b.closed
    for _ in range(3):
        async with b.borrow(timeout=10) as conn:
            assert await query(conn) == 1
    totals: dict[str, Any] = b.totals()
    assert totals["borrows"] == 4 and totals["timeouts"] == 0


async def test_a_driver_refused_by_the_server_is_checked_and_replaced(
    make_broker: MakeBroker,
) -> None:
    """verify_on_create=False and a wrong password: the first query's AuthError
    sends the driver back to be checked; it is discarded, counted, and once the
    secret is right the next borrows get a new driver."""
    right = make_broker().config.password
    secret = {"password": "not-the-password"}
    b = make_broker(
        pool_min_size=0,
        pool_max_size=1,
        verify_on_create=False,
        credentials=lambda: secret["password"],
    )
    with pytest.raises(neo4j.exceptions.AuthError):
        async with b.borrow() as conn:
            await query(conn)
    await eventually(lambda: b.totals()["drivers_lost"] == 1, what="the bad driver discarded")
    (entry,) = (await b.stats()).values()
    assert entry["returns_bad"] == 1 and entry["errors"] == 1
    assert entry["last_error"] is not None and "AuthError" in entry["last_error"]
    secret["password"] = right
    for _ in range(5):
        async with b.borrow(timeout=10) as conn:
            assert await query(conn) == 1
    assert b.totals()["discarded"] == 1


async def test_a_creation_error_reaches_only_the_waiters_it_could_have_served(
    make_broker: MakeBroker,
) -> None:
    """A credentials call hangs during a short outage of the secret store; the
    borrowers who arrive after it ended get a new attempt, not the old error,
    and the error names what hung."""
    right = make_broker().config.password
    outage = asyncio.Event()

    async def credentials() -> str:
        if not outage.is_set():
            await asyncio.sleep(60)  # the secret store does not answer
        return right

    b = make_broker(
        pool_min_size=0,
        pool_max_size=1,
        connection_acquisition_timeout=2.0,
        credentials=credentials,
    )
    first = asyncio.ensure_future(b.borrow(timeout=10).__aenter__())
    await asyncio.sleep(0.7)
    outage.set()  # the store is back; the attempt under way still hangs

    async def borrow_once() -> int:
        async with b.borrow(timeout=10) as conn:
            return await query(conn)

    results = await asyncio.gather(*(borrow_once() for _ in range(5)), return_exceptions=True)
    assert results == [1] * 5
    with pytest.raises(TimeoutError, match=r"credentials\(\) did not return within 2 s"):
        await first


async def test_a_slow_on_create_hook_is_named_with_its_limit(make_broker: MakeBroker) -> None:
    async def slow_hook(driver: neo4j.AsyncDriver) -> None:
        await asyncio.sleep(5)

    b = make_broker(
        pool_min_size=0, pool_max_size=1, connection_acquisition_timeout=0.5, on_create=slow_hook
    )
    with pytest.raises(TimeoutError) as failed:
        async with b.borrow(timeout=5):
            pass
    assert "on_create hook" in str(failed.value) and "slow_hook" in str(failed.value)
    assert "0.5 s" in str(failed.value)
    (entry,) = (await b.stats()).values()
    assert "slow_hook" in entry["last_error"] and entry["hook_errors"] == 1


async def test_max_waiting_does_not_count_a_cancelled_waiter(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1, max_waiting=1)
    async with b.borrow() as held:
        waiter = asyncio.ensure_future(b.borrow(timeout=10).__aenter__())
        await asyncio.sleep(0.05)  # it waits
        # In one loop step: the waiter is cancelled, and a new borrow comes
        # (its task runs before the cancelled one posts its withdrawal).
        follower = asyncio.ensure_future(b.borrow(timeout=10).__aenter__())
        waiter.cancel()
        await asyncio.sleep(0)
        assert await query(held) == 1
    conn = await asyncio.wait_for(follower, 10)
    assert await query(conn) == 1
    await conn.release()
    totals = b.totals()
    assert totals["rejected"] == 0 and totals["cancellations"] == 1


async def test_a_driver_closed_by_its_borrower_never_goes_back_into_service(
    make_broker: MakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A library's finalize() closes the driver it holds: the pool discards it,
    counts it, says so, and the next borrows get a working driver."""
    b = make_broker(pool_min_size=0, pool_max_size=1)
    async with b.borrow() as conn:
        await query(conn)
        await conn.driver.close()
    for _ in range(5):
        async with b.borrow(timeout=10) as conn:
            assert await query(conn) == 1
    totals = b.totals()
    assert totals["discarded"] == 1 and totals["created"] == 2
    warned = [r for r in caplog.records if "driver.closed_by_borrower" in r.getMessage()]
    assert warned and "loop=" in warned[0].getMessage()


# -- failed logins, remembered broker-wide ------------------------------------------------


def test_a_stale_password_is_tried_once_per_backoff_not_once_per_loop(
    bolt_config: broker.Neo4jConnectionConfig,
) -> None:
    """asyncio.run per task with a stale password: one login, then every task
    fails at once without contacting the server, until the backoff ends or
    the secret changes."""
    secret = {"password": "stale-password-1"}
    made: list[Any] = []

    def counting_factory(config: broker.Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        made.append(config.username)
        return broker.broker.default_driver_factory(config)

    b = Broker(
        bolt_config.replace(
            pool_min_size=0,
            pool_max_size=2,
            auth_retry_first=30.0,
            credentials=lambda: secret["password"],
        ),
        driver_factory=counting_factory,
    )

    async def task() -> int:
        async with b.borrow(timeout=10) as conn:
            return await query(conn)

    with pytest.raises(neo4j.exceptions.AuthError) as first:
        asyncio.run(task())
    assert not isinstance(first.value, broker.AuthBackoff), "the first is the server's answer"
    started = time.monotonic()
    for _ in range(10):
        with pytest.raises(broker.AuthBackoff) as refused:
            asyncio.run(task())
    assert time.monotonic() - started < 5, "refused at once, not after a login"
    assert len(made) == 1, "one login for eleven loops"
    text = str(refused.value)
    assert repr(bolt_config.username) in text and "stale-password" not in text
    assert isinstance(refused.value.__cause__, neo4j.exceptions.AuthError)
    secret["password"] = bolt_config.password  # the secret was rotated: tried at once
    assert asyncio.run(task()) == 1
    assert len(made) == 2
    b.close()


def test_drain_lets_a_login_be_tried_at_once(bolt_config: broker.Neo4jConnectionConfig) -> None:
    b = Broker(
        bolt_config.replace(pool_min_size=0, password="stale-password-2", auth_retry_first=30.0)
    )

    async def task() -> None:
        async with b.borrow(timeout=10):
            pass

    with pytest.raises(neo4j.exceptions.AuthError):
        asyncio.run(task())
    with pytest.raises(broker.AuthBackoff):
        asyncio.run(task())
    b.drain()
    with pytest.raises(neo4j.exceptions.AuthError) as again:
        asyncio.run(task())
    assert not isinstance(again.value, broker.AuthBackoff), "drain() let a real login through"
    b.close()


async def test_the_created_event_counts_the_new_driver(
    make_broker: MakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """``driver.created ... total=0`` read as a contradiction: the event counts
    the driver it announces, where it went (here: to the waiting borrower)."""
    b = make_broker(pool_min_size=0, pool_max_size=1)
    async with b.borrow() as conn:
        await query(conn)
    (created,) = [r.getMessage() for r in caplog.records if "driver.created" in r.getMessage()]
    assert " total=1" in created and " in_use=1" in created, created


def test_pops_while_four_loops_borrow_in_bursts_add_up_to_the_totals(
    bolt_config: broker.Neo4jConnectionConfig,
) -> None:
    """Four threads borrow in bursts (a persistent loop each, and asyncio.run
    per burst on one of them, so loops also end) while a fifth pops the stats:
    the pops, ended loops included, add up to exactly the borrows counted."""
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    stop = threading.Event()
    popped: list[int] = []

    async def burst() -> None:
        for _ in range(20):
            async with b.borrow(timeout=10):
                await asyncio.sleep(0)

    def persistent() -> None:
        while not stop.is_set():
            broker.run(burst())

    def short_lived() -> None:
        while not stop.is_set():
            asyncio.run(burst())

    def popper() -> None:
        while not stop.is_set():
            popped.extend(entry["borrows"] for entry in b.pop_stats().values())
            time.sleep(0.01)

    threads = [threading.Thread(target=t) for t in (persistent, persistent, persistent)]
    threads += [threading.Thread(target=short_lived), threading.Thread(target=popper)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(30)
    broker.runner.shutdown(10)
    popped.extend(entry["borrows"] for entry in b.pop_stats().values())
    total = b.totals()["borrows"]
    assert total > 100 and sum(popped) == total, (sum(popped), total)
    b.close()


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="from 3.12 a cancelled task keeps its CancelledError, whose traceback holds the "
    "driver's own frames: there the collector frees the driver whatever the broker does",
)
def test_a_creation_cut_short_by_the_loop_end_leaves_its_driver_to_no_one(
    bolt_config: broker.Neo4jConnectionConfig, bolt_server: Any
) -> None:
    """A creation in flight when asyncio.run ends the loop: its driver (and so
    its sockets) is freed at once, not kept by a reference cycle until the
    collector runs (an error kept in a local of the cancelled job did that)."""
    import gc
    import weakref

    from broker.testing.faults import FaultProxy
    from tests.helpers import bolt_port

    made: list[weakref.ref[Any]] = []

    def recording_factory(config: broker.Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        driver = broker.broker.default_driver_factory(config)
        made.append(weakref.ref(driver))
        return driver

    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        proxy.delay_handshake(2.0)  # the creation is still verifying when the loop ends
        b = Broker(
            bolt_config.replace(uri=proxy.uri, pool_min_size=0), driver_factory=recording_factory
        )

        async def main() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    async with b.borrow(timeout=10):
                        pass

        gc.disable()
        try:
            asyncio.run(main())
            assert made, "a creation was under way"
            assert [r for r in made if r() is not None] == [], "a driver outlived its loop"
        finally:
            gc.enable()
            b.close()
