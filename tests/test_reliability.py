"""Storms of short-lived loops, and loops that die badly, against the real server."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import threading
import time
import weakref
from collections import defaultdict
from typing import Any

import neo4j
import pytest

from broker import Broker, BrokerClosed, Connection, Neo4jConnectionConfig
from broker.broker import default_driver_factory
from broker.testing import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port, eventually_sync
from tests.load import CROSS_LOOP, Load, cross_loop_errors, errors_by_type

pytestmark = pytest.mark.slow

THREADS, LOOPS, BORROWERS = 16, 200, 20


class Recorder:
    """Which loop got which driver, and every driver ever made (weakly)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: dict[int, int] = {}  # PooledDriver id -> loop serial
        self.double_handouts: list[tuple[int, int, int]] = []
        self.loop_ids: dict[int, set[int]] = defaultdict(set)  # id(loop) -> loop serials
        self.unclosed_pools: list[str] = []
        self.unexpected: list[BaseException] = []
        self.drivers: list[weakref.ref[neo4j.AsyncDriver]] = []

    def factory(self, config: Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        driver = default_driver_factory(config)
        with self.lock:
            self.drivers.append(weakref.ref(driver))
        return driver

    def handed(self, driver_id: int, serial: int) -> None:
        with self.lock:
            previous = self.owner.setdefault(driver_id, serial)
            if previous != serial:
                self.double_handouts.append((driver_id, previous, serial))


def test_storm_of_short_lived_loops(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    """16 threads x 200 loops x 20 concurrent borrowers, with random cancellations."""
    port = bolt_port(bolt_server)
    baseline = open_connections(port)
    rec = Recorder()
    b = Broker(bolt_config.replace(pool_max_size=2, pool_min_size=0), driver_factory=rec.factory)
    serials = itertools.count()
    cancelled = 0

    async def one_loop(serial: int, rng: random.Random) -> None:
        nonlocal cancelled
        loop = asyncio.get_running_loop()
        with rec.lock:
            rec.loop_ids[id(loop)].add(serial)

        async def borrower(i: int) -> None:
            async with b.borrow() as conn:
                assert conn.pooled is not None
                rec.handed(conn.pooled.id, serial)
                if i % 4 == 0:
                    await conn.driver.execute_query("RETURN 1")
                else:
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(borrower(i)) for i in range(BORROWERS)]
        for task in rng.sample(tasks, 3):  # cancel some, at random moments
            loop.call_later(rng.random() * 0.01, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                cancelled += 1
            elif isinstance(result, BaseException):
                rec.unexpected.append(result)
        actor = b.actor_of(loop)
        assert actor is not None
        actors[serial] = actor

    actors: dict[int, Any] = {}

    def thread_main(t: int) -> None:
        rng = random.Random(t)
        for _ in range(LOOPS):
            serial = next(serials)
            try:
                asyncio.run(one_loop(serial, rng))
            except BaseException as exc:
                rec.unexpected.append(exc)
                continue
            actor = actors.pop(serial)
            # The pool was closed, in its loop, before asyncio.run returned.
            if not actor.finished or actor.pool.counters.created != actor.pool.counters.closed:
                rec.unclosed_pools.append(actor.key)

    started = time.monotonic()
    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    elapsed = time.monotonic() - started

    assert not any(t.is_alive() for t in threads), "a storm thread hung"
    assert [e for e in rec.unexpected if CROSS_LOOP in str(e)] == []
    assert rec.unexpected == [], rec.unexpected[:5]
    assert rec.double_handouts == [], "a driver was handed to two loops"
    reused = sum(1 for serials_ in rec.loop_ids.values() if len(serials_) > 1)
    assert reused > 0, "id(loop) was never reused: the storm did not test what it should"
    assert rec.unclosed_pools == []
    assert cancelled > 0
    totals = b.totals()
    assert totals["created"] == totals["closed"]
    # Creations cut short when a loop ended never count as created, but their
    # drivers were closed too: every driver object ever made is closed or gone.
    left_open = [r for r in rec.drivers if (d := r()) is not None and not d._closed]
    assert left_open == []
    assert totals["borrows"] >= THREADS * LOOPS * (BORROWERS - 3)
    assert b.stats_sync() == {}, "no loop left behind in the registry"
    assert open_connections(port) == baseline, "no Bolt socket left open"
    print(
        f"\nstorm: {THREADS * LOOPS} loops, {totals['borrows']} borrows, "
        f"{totals['created']} drivers, {cancelled} cancellations, "
        f"{reused} reused loop ids, {elapsed:.1f} s"
    )
    b.close()


def _work(b: Broker) -> Any:
    async def work() -> None:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")

    return work()


def _other_loops_keep_working(b: Broker) -> Load:
    return Load(b, threads=2, concurrency=2, loop_seconds=0.3).start()


def _assert_load_clean(load: Load) -> None:
    outcomes = load.stop()
    assert outcomes and cross_loop_errors(outcomes) == []
    assert errors_by_type(outcomes) == {}, errors_by_type(outcomes)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_loop_closed_without_cancelling_its_tasks(
    bolt_config: Neo4jConnectionConfig,
) -> None:
    rec = Recorder()
    b = Broker(bolt_config.replace(pool_min_size=0), driver_factory=rec.factory)
    load = _other_loops_keep_working(b)
    try:
        for _ in range(10):
            loop = asyncio.new_event_loop()
            loop.run_until_complete(_work(b))
            loop.close()  # the actor task is still pending: nobody cancelled it
            del loop
        gc.collect()
        with rec.lock:
            left = [ref for ref in rec.drivers[:] if ref() is not None]
        # Only the load's own live loops may still hold drivers.
        assert len(left) <= 2 * b.config.pool_max_size
    finally:
        _assert_load_clean(load)
    gc.collect()
    assert b.stats_sync() == {}
    b.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_thread_that_exits_with_its_loop_open(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer
) -> None:
    rec = Recorder()
    port = bolt_port(bolt_server)
    baseline = open_connections(port)
    b = Broker(bolt_config.replace(pool_min_size=0), driver_factory=rec.factory)
    load = _other_loops_keep_working(b)

    def leave_loop_open() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(_work(b))
        # The thread ends; the loop is neither closed nor stopped by anyone.

    try:
        for _ in range(10):
            thread = threading.Thread(target=leave_loop_open)
            thread.start()
            thread.join()
    finally:
        _assert_load_clean(load)
    gc.collect()
    assert all(ref() is None for ref in rec.drivers), "drivers of abandoned loops were freed"
    assert b.stats_sync() == {}
    eventually_sync(lambda: open_connections(port) == baseline, what="their sockets closed")
    b.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_loop_stops_while_a_release_is_in_flight(bolt_config: Neo4jConnectionConfig) -> None:
    rec = Recorder()
    b = Broker(bolt_config.replace(pool_min_size=0), driver_factory=rec.factory)
    load = _other_loops_keep_working(b)
    try:
        # 1. The release arrives while the loop is stopped; the loop runs again later.
        b1 = Broker(bolt_config.replace(pool_min_size=0), driver_factory=rec.factory)
        loop = asyncio.new_event_loop()
        conn: Connection = loop.run_until_complete(b1.borrow())
        released = threading.Thread(target=conn.release_sync)
        released.start()
        released.join()
        actor = b1.actor_of(loop)
        assert actor is not None and actor.snapshot()["in_use"] == 1, "not handled yet"
        stats = loop.run_until_complete(b1.stats())
        assert stats[actor.key]["in_use"] == 0 and stats[actor.key]["available"] == 1
        loop.run_until_complete(b1.aclose(timeout=2))
        loop.close()

        # 2. The release arrives after the loop was closed: dropped quietly.
        b2 = Broker(bolt_config.replace(pool_min_size=0), driver_factory=rec.factory)
        loop = asyncio.new_event_loop()
        conn = loop.run_until_complete(b2.borrow())
        loop.close()
        errors: list[BaseException] = []

        def late_release(handle: Connection) -> None:
            try:
                handle.release_sync()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=late_release, args=(conn,))
        thread.start()
        thread.join()
        assert errors == []
        with pytest.raises(BrokerClosed):
            asyncio.run(b1.borrow().__aenter__())
        del loop, conn
        gc.collect()
        assert b2.stats_sync() == {}
        b2.close()
    finally:
        _assert_load_clean(load)
