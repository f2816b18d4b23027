"""Threads racing the broker's lifecycle: configure, close, and storms of short loops."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import broker
from broker import Broker, BrokerClosed, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually, eventually_sync, run_strict


def test_configure_again_and_again_while_other_threads_borrow(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    config = bolt_config.replace(pool_min_size=0, pool_max_size=2, close_timeout=2)
    made = [broker.configure(config)]
    stop = threading.Event()
    served = 0
    errors: list[BaseException] = []

    async def borrow_a_few() -> None:
        nonlocal served
        for _ in range(5):
            try:
                async with broker.borrow(timeout=10) as conn:
                    await conn.driver.execute_query("RETURN 1")
                    served += 1
            except BrokerClosed:
                pass  # borrowed from a default that was just replaced: expected
            except BaseException as exc:
                errors.append(exc)

    def borrower() -> None:
        while not stop.is_set():
            asyncio.run(borrow_a_few())

    threads = [threading.Thread(target=borrower) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(30):
            time.sleep(0.02)
            made.append(broker.configure(config))
        # A login can outlast the 20 ms between two brokers (on Neo4j under
        # load, every one did): the last default serves, however long that takes.
        eventually_sync(lambda: served > 0, timeout=30, what="a borrow served by the last default")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == [], errors[:5]
    assert served > 0
    broker.close(timeout=5)
    for b in made:
        assert b.closed and b.stats_sync() == {}, "every replaced broker closed its pools"
        totals = b.totals()
        assert totals["created"] == totals["closed"], totals
    eventually_sync(lambda: open_connections(bolt_port(bolt_server)) == 0, what="no socket open")


async def test_close_while_thousands_of_waiters_queue(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    b = Broker(bolt_config.replace(pool_min_size=0, pool_max_size=2, close_timeout=5))
    held = [await b.borrow(), await b.borrow()]
    waiters = 3000

    async def waiter() -> None:
        async with b.borrow(timeout=60):
            pass

    tasks = [asyncio.create_task(waiter()) for _ in range(waiters)]
    actor = b.actors()[0]
    await eventually(lambda: actor.snapshot()["waiting"] == waiters, what="all queued")
    closing = asyncio.create_task(asyncio.to_thread(b.close, 5))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BrokerClosed) for r in results), {type(r) for r in results}
    for conn in held:
        await conn.release()  # the drivers in use close as they come back
    await closing
    totals = b.totals()
    assert totals["created"] == totals["closed"] == 2 and actor.finished
    assert open_connections(bolt_port(bolt_server)) == 0


STORM = """
    import asyncio, gc, json, os, sys, threading
    import broker
    from broker.testing.sockets import open_connections

    threads, loops, borrowers, port = (int(a) for a in sys.argv[1:5])
    b = broker.Broker(broker.Neo4jConnectionConfig.from_env().replace(pool_min_size=0))
    errors = []

    async def one_loop():
        async def borrower():
            async with b.borrow() as conn:
                await conn.driver.execute_query("RETURN 1")
        await asyncio.gather(*(borrower() for _ in range(borrowers)))

    def thread_main():
        for _ in range(loops):
            try:
                asyncio.run(one_loop())
            except BaseException as exc:
                errors.append(repr(exc))

    workers = [threading.Thread(target=thread_main) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out = {"errors": errors[:5], "sockets": open_connections(port), "totals": b.totals()}
    out["loops_left"] = len(b.stats_sync())
    b.close()
    gc.collect()
    print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a few minutes on 2 busy cores; a hang still ends
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "debug-mode"])
def test_threads_of_short_loops(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer, strict: bool
) -> None:
    """8 threads x many asyncio.run loops x 5 borrowers, in a child interpreter.

    The debug-mode run has asyncio's debug mode on and ResourceWarning as an
    error: a task left pending or a socket left open would show on stderr.
    ``STORM_LOOPS`` sets the loops per thread (default 300 plain, 200 in debug
    mode, where each loop costs several times as much).
    """
    loops = int(os.environ.get("STORM_LOOPS", "200" if strict else "300"))
    args = ("8", str(loops), "5", str(bolt_port(bolt_server)))
    started = time.monotonic()
    out = run_strict(STORM, bolt_config, *args, strict=strict, timeout=1100)
    totals = out["totals"]
    assert out["errors"] == [] and out["sockets"] == 0 and out["loops_left"] == 0, out
    assert totals["borrows"] == 8 * loops * 5
    assert totals["created"] == totals["closed"] > 0
    print(f"\n{8 * loops} loops, {totals['borrows']} borrows, {time.monotonic() - started:.1f} s")
