"""Cancellation around a borrow, from every side users reach for, loses nothing.

After each scenario the pool has nothing in use, no waiter, never more than
``pool_max_size`` drivers, and its next borrow is served.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from broker import Broker
from broker.testing import BoltServer
from broker.testing.faults import FaultProxy
from tests.helpers import bolt_port, eventually

MakeBroker = Callable[..., Broker]


async def _pool(b: Broker) -> dict[str, Any]:
    (entry,) = (await b.stats()).values()
    return entry


async def assert_intact(b: Broker, max_size: int) -> dict[str, Any]:
    """Nothing in use or waiting, the bound held, and a borrow is served at once."""
    await eventually(lambda: b.actors()[0].snapshot()["in_use"] == 0, what="all back")
    async with b.borrow(timeout=10) as conn:
        await conn.driver.execute_query("RETURN 1")
    pool = await _pool(b)
    assert pool["in_use"] == 0 and pool["waiting"] == 0, pool
    assert pool["total"] <= max_size and pool["created"] - pool["closed"] == pool["total"], pool
    return pool


async def test_asyncio_timeout_around_a_borrow(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1)
    held = await b.borrow()
    for _ in range(5):  # waiting in the queue when the timeout strikes
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02), b.borrow():
                pass
    await held.release()
    for delay in (0, 0.0001, 0.001, 0.01):  # at every step of a borrow that would succeed
        for _ in range(10):
            try:
                async with asyncio.timeout(delay), b.borrow() as conn:
                    await conn.driver.execute_query("RETURN 1")
            except TimeoutError:
                pass
    pool = await assert_intact(b, 1)
    assert pool["cancellations"] >= 5


async def test_wait_for_zero_around_a_borrow(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=2)
    async with b.borrow():
        pass  # one idle driver
    for _ in range(50):
        try:
            conn = await asyncio.wait_for(b.borrow(), 0)
        except TimeoutError:
            continue
        await conn.release()
    await assert_intact(b, 2)


@pytest.mark.parametrize("holding", [True, False], ids=["sibling-holds", "sibling-waits"])
async def test_task_group_whose_sibling_fails(make_broker: MakeBroker, holding: bool) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1)
    blocker = None if holding else await b.borrow()
    got_it = asyncio.Event()

    async def borrower() -> None:
        async with b.borrow() as conn:
            got_it.set()
            await conn.driver.execute_query("RETURN 1")
            await asyncio.sleep(3600)

    async def failing() -> None:
        if holding:
            await got_it.wait()
        else:
            await asyncio.sleep(0.05)
        raise ValueError("a sibling fails")

    async def together() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(borrower())
            group.create_task(failing())

    with pytest.raises(ExceptionGroup) as caught:
        await together()
    assert caught.group_contains(ValueError)
    if blocker is not None:
        await blocker.release()
    await assert_intact(b, 1)


@pytest.mark.slow
async def test_storm_of_random_cancels_while_the_server_is_slow(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        b = make_broker(uri=proxy.uri, pool_min_size=0, pool_max_size=3, max_idle_time=0.5)
        proxy.delay_handshake(0.3)  # every new connection takes 0.3 s to answer
        rng = random.Random(7)
        served = 0

        async def borrower() -> None:
            nonlocal served
            async with b.borrow(timeout=30) as conn:
                await conn.driver.execute_query("RETURN 1")
                served += 1

        for _ in range(4):
            tasks = [asyncio.create_task(borrower()) for _ in range(60)]
            for task in tasks:
                asyncio.get_running_loop().call_later(rng.random() * 0.8, task.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            unexpected = [
                r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)
            ]
            assert unexpected == [], unexpected
            await asyncio.sleep(rng.random() * 0.6)  # some idle drivers expire meanwhile
        proxy.pass_through()
        pool = await assert_intact(b, 3)
    assert served > 0 and pool["cancellations"] > 0, pool
