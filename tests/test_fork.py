"""After os.fork() the child never uses, and never counts, its parent's pools."""

from __future__ import annotations

import asyncio
import os

import pytest

from broker import Broker, Neo4jConnectionConfig


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_child_starts_with_no_pools_and_no_counts(bolt_config: Neo4jConnectionConfig) -> None:
    b = Broker(bolt_config.replace(pool_min_size=0))

    async def driver_id() -> int:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")
            return id(conn.driver)

    loop = asyncio.new_event_loop()
    parent_driver = loop.run_until_complete(driver_id())
    assert b.totals()["created"] == 1 and len(b.stats_sync()) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            fresh = b.stats_sync() == {} and b.totals()["created"] == 0
            child_driver = asyncio.run(driver_id())
            code = 0 if fresh and child_driver != parent_driver else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == bytes([0]), f"child reported {answer!r}"
    loop.run_until_complete(b.aclose())
    loop.close()
