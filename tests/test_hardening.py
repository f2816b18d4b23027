"""What a second round of attempts to break the broker found, each against the real server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import broker
from broker import Broker

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
