"""Backpressure, readiness, check, resize, drain and rotation, max_borrows, hooks and
timing stats, against the real embedded server."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import neo4j
import neo4j.exceptions
import pytest
import structlog
from neo4j.auth_management import AsyncAuthManagers

import broker
from broker import BorrowTimeout, Broker, Neo4jConnectionConfig, TooManyWaiters
from broker.actor import Actor
from broker.broker import default_driver_factory
from broker.testing import BoltServer, EmbeddedServer, Neo4jServer
from broker.testing.faults import FaultProxy
from tests.conftest import PLANTED_SECRETS, SecretWatch
from tests.helpers import bolt_port, eventually

MakeBroker = Callable[..., Broker]


async def query(conn: broker.Connection, value: int = 1) -> int:
    records, _, _ = await conn.driver.execute_query("RETURN $v AS v", v=value)
    return int(records[0]["v"])


def here(b: Broker) -> Actor:
    """This loop's actor."""
    (actor,) = [a for a in b.actors() if a.loop is asyncio.get_running_loop()]
    return actor


class BoundWatch(Broker):
    """Checks, at the moment each creation starts, that the pool is within its maximum."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken: list[str] = []

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        actor = super()._new_actor(loop)
        start_create = actor.start_create

        def checked(*args: Any) -> None:
            if actor.pool.total() > actor.pool.max_size:  # the new one is counted already
                self.broken.append(f"{actor.pool.total()} > {actor.pool.max_size}")
            start_create(*args)

        actor.start_create = checked  # type: ignore[method-assign]
        return actor


@dataclass
class LoadRun:
    """Borrowers in one loop, querying until told to stop; what they met."""

    errors: list[BaseException] = field(default_factory=list)
    served: list[tuple[float, int]] = field(default_factory=list)  # (start, driver id)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


async def load(b: Broker, run: LoadRun, workers: int, hold: float = 0.005) -> None:
    async def worker() -> None:
        while not run.stop.is_set():
            started = time.monotonic()
            try:
                async with b.borrow(timeout=20) as conn:
                    assert conn.pooled is not None
                    run.served.append((started, id(conn.driver)))
                    await query(conn)
                    await asyncio.sleep(hold)
            except Exception as exc:
                run.errors.append(exc)

    async def sampler() -> None:
        # Read in the loop's own thread, between the actor's steps: a consistent view.
        while not run.stop.is_set():
            for actor in b.actors():
                if actor.loop is asyncio.get_running_loop():
                    run.samples.append(actor.snapshot())
            await asyncio.sleep(0.002)

    await asyncio.gather(sampler(), *(worker() for _ in range(workers)))


def in_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def over_the_bound(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples where the pool held more than its max while creating or keeping idle ones."""
    return [
        s
        for s in samples
        if s["total"] > s["max_size"] and (s["creating"] or s["available"] or s["checking"])
    ]


# -- backpressure --------------------------------------------------------------------------


async def test_max_waiting_under_a_storm(make_broker: MakeBroker) -> None:
    b = make_broker(pool_max_size=2, pool_min_size=0, max_waiting=5)
    async with b.borrow() as conn:  # warm: one driver exists
        await query(conn)
    peak_waiting = 0

    async def borrower(i: int) -> str:
        nonlocal peak_waiting
        try:
            async with b.borrow(timeout=20) as conn:
                peak_waiting = max(peak_waiting, here(b).snapshot()["waiting"])
                await query(conn, i)
                await asyncio.sleep(0.01)
        except TooManyWaiters:
            return "rejected"
        return "served"

    outcomes = await asyncio.gather(*(borrower(i) for i in range(80)))
    stats = here(b).snapshot()
    rejected = outcomes.count("rejected")
    assert 0 < rejected < 80 and outcomes.count("served") == 80 - rejected
    assert stats["rejected"] == rejected and stats["timeouts"] == 0
    assert stats["borrows"] == 1 + 80 - rejected
    assert peak_waiting <= 5 and stats["created"] <= 2 and stats["waiting"] == 0
    async with b.borrow(timeout=1) as conn:  # nothing was lost
        assert await query(conn) == 1


# -- readiness -----------------------------------------------------------------------------


async def test_wait_against_a_good_server(make_broker: MakeBroker) -> None:
    b = make_broker(pool_min_size=2, pool_max_size=4)
    await b.wait(timeout=20)
    stats = here(b).snapshot()
    assert stats["available"] == 2 and stats["created"] == 2 and stats["ready"] == 2
    await b.wait(timeout=0)  # ready: answered at once, nothing made
    assert here(b).snapshot()["created"] == 2


async def test_wait_with_a_wrong_password_raises_the_auth_error(make_broker: MakeBroker) -> None:
    b = make_broker(password="wrong-password", pool_min_size=1, pool_max_size=2)
    with pytest.raises(neo4j.exceptions.AuthError):
        await b.wait(timeout=20)
    assert here(b).snapshot()["connect_errors"] >= 1


async def test_wait_and_borrow_against_a_black_hole_name_target_and_time(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        proxy.blackhole()
        b = make_broker(
            uri=proxy.uri,
            pool_min_size=1,
            pool_max_size=1,
            connection_timeout=10.0,
            connection_acquisition_timeout=10.0,
        )
        with pytest.raises(BorrowTimeout) as not_ready:
            await b.wait(timeout=1.0)
        with pytest.raises(BorrowTimeout) as timed_out:
            await b.borrow(timeout=1.0)
        proxy.pass_through()
        proxy.reset_all()  # the creation stuck in the hole ends now
    target = re.escape(f"bolt://127.0.0.1:{proxy.port}")
    pattern = rf"1 driver connecting to {target} for (\d+\.\d) s"
    assert "pool not ready within 1 s: 0 of 1 drivers ready" in str(not_ready.value)
    for error in (not_ready.value, timed_out.value):
        found = re.search(pattern, str(error))
        assert found, str(error)
        assert float(found.group(1)) >= 0.9
    # The borrow's wait started 1 s after the creation did: the time is the creation's.
    assert float(re.search(pattern, str(timed_out.value)).group(1)) >= 1.9  # type: ignore[union-attr]


async def test_after_a_failed_creation_waiters_get_its_error_not_a_timeout(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        proxy.blackhole()
        b = make_broker(
            uri=proxy.uri,
            pool_min_size=0,
            pool_max_size=1,
            connection_timeout=10.0,
            connection_acquisition_timeout=1.0,
        )
        # Each would wait 2.5 s: long enough for two more attempts of 1 s each.
        results = await asyncio.gather(
            *(b.borrow(timeout=2.5).__aenter__() for _ in range(3)), return_exceptions=True
        )
        proxy.pass_through()
        proxy.reset_all()
    assert [type(r).__name__ for r in results] == ["ServiceUnavailable"] * 3
    assert f"could not connect to {proxy.uri} as {b.config.username!r} within 1 s" in str(
        results[0]
    )
    stats = here(b).snapshot()
    # The first attempt's error goes to the borrower it was made for; the two
    # that came while it ran get one more attempt, and its error.
    assert stats["connect_errors"] == 2 and stats["timeouts"] == 0
    assert stats["last_error"].startswith("ServiceUnavailable: could not connect to")


# -- check ---------------------------------------------------------------------------------


async def test_check_after_the_server_was_killed_and_restarted(
    restartable_server: EmbeddedServer,
) -> None:
    server = restartable_server
    b = Broker(
        Neo4jConnectionConfig(
            uri=server.uri,
            username=server.auth[0],
            password=server.auth[1],
            pool_min_size=2,
            pool_max_size=3,
            connection_timeout=2.0,
            connection_acquisition_timeout=3.0,
            health_check_timeout=2.0,
        )
    )
    try:
        await b.wait(timeout=20)
        assert await b.check() == 0, "a healthy pool loses nothing"
        await asyncio.to_thread(server.kill)
        assert await b.check() == 2, "both idle drivers failed their check"
        assert here(b).snapshot()["drivers_lost"] == 2
        await eventually(lambda: here(b).snapshot()["discarded"] == 2, what="closed")
        with pytest.raises(neo4j.exceptions.ServiceUnavailable):
            await b.wait(timeout=10)
        await asyncio.to_thread(server.restart)
        await b.wait(timeout=30)
        assert await b.check() == 0
        async with b.borrow(timeout=10) as conn:
            assert await query(conn, 7) == 7
    finally:
        await b.aclose()


# -- resize --------------------------------------------------------------------------------


async def test_resize_up_and_down_under_load(bolt_config: Neo4jConnectionConfig) -> None:
    b = BoundWatch(bolt_config.replace(pool_min_size=0, pool_max_size=2))
    mine, other = LoadRun(), LoadRun()
    thread = in_thread(lambda: asyncio.run(load(b, other, workers=6)), "resize-load")
    task = asyncio.create_task(load(b, mine, workers=6))
    phases: list[tuple[int, int]] = []

    def phase(min_size: int, max_size: int, from_thread: bool) -> None:
        if from_thread:
            in_thread(lambda: b.resize(min_size, max_size), "resizer").join()
        else:
            b.resize(min_size, max_size)
        phases.append((min_size, max_size))

    try:
        await asyncio.sleep(0.5)
        phase(0, 4, from_thread=True)
        await eventually(lambda: here(b).snapshot()["total"] == 4, what="grew to 4 under load")
        await asyncio.sleep(0.3)
        phase(0, 1, from_thread=False)
        await eventually(lambda: here(b).snapshot()["total"] <= 1, what="shrank to 1 under load")
        await asyncio.sleep(0.5)
        phase(1, 3, from_thread=True)
        await eventually(lambda: here(b).snapshot()["total"] == 3, what="grew to 3 under load")
        await asyncio.sleep(0.3)
    finally:
        mine.stop.set()
        other.stop.set()
        await task
        await asyncio.to_thread(thread.join)

    # A loop born after the resizes starts with the new bounds.
    async def newcomer() -> dict[str, Any]:
        async with b.borrow() as conn:
            await query(conn)
        return here(b).snapshot()

    born_later = await asyncio.to_thread(asyncio.run, newcomer())
    assert (born_later["min_size"], born_later["max_size"]) == (1, 3)
    await b.aclose()

    assert mine.errors == [] and other.errors == []
    assert b.broken == [], "a driver was created beyond the current maximum"
    for run in (mine, other):
        assert len(run.samples) > 100
        assert over_the_bound(run.samples) == [], "above the max with idle or new drivers"
        maxima = [s["max_size"] for s in run.samples]
        assert {2, 4, 1, 3} <= set(maxima), "every phase was sampled"
        assert max(s["total"] for s in run.samples if s["max_size"] == 1) <= 4
    shrunk = [s for s in mine.samples if s["max_size"] == 1]
    # Once down to the bound, it never rose above it again while the max was 1.
    first = next(i for i, s in enumerate(shrunk) if s["total"] <= 1)
    assert all(s["total"] <= 1 for s in shrunk[first:])


# -- drain and rotation ----------------------------------------------------------------------


async def test_drain_under_load_closes_every_old_driver(bolt_config: Neo4jConnectionConfig) -> None:
    made: list[tuple[float, neo4j.AsyncDriver]] = []
    lock = threading.Lock()

    def factory(config: Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        driver = neo4j.AsyncGraphDatabase.driver(config.uri, **config.driver_kwargs())
        with lock:
            made.append((time.monotonic(), driver))
        return driver

    b = Broker(bolt_config.replace(pool_min_size=1, pool_max_size=3), driver_factory=factory)
    mine, other = LoadRun(), LoadRun()
    thread = in_thread(lambda: asyncio.run(load(b, other, workers=5)), "drain-load")
    task = asyncio.create_task(load(b, mine, workers=5))
    try:
        await asyncio.sleep(0.7)
        old_drivers = [d for _, d in made]
        old = {id(d) for d in old_drivers}
        drained_at = time.monotonic()
        await asyncio.to_thread(b.drain)  # from another thread
        # Closed by the drain while both loops go on (not by their end).
        await eventually(
            lambda: all(d._closed for d in old_drivers),  # type: ignore[attr-defined]
            what="every old driver closed under load",
        )
        await asyncio.sleep(0.5)
    finally:
        mine.stop.set()
        other.stop.set()
        await task
        await asyncio.to_thread(thread.join)
    try:
        assert mine.errors == [] and other.errors == [], "no borrower saw the drain"
        assert len(old) >= 2
        for run in (mine, other):
            late = [driver for started, driver in run.served if started > drained_at + 0.2]
            assert late, "the load went on after the drain"
            assert not set(late) & old, "an old driver was handed out after the drain"
        assert here(b).snapshot()["generation"] == 1
    finally:
        await b.aclose()


@pytest.fixture
def rotating_user(
    bolt_server: BoltServer,
) -> Iterator[tuple[EmbeddedServer | Neo4jServer, dict[str, str]]]:
    """A user of its own on the local server, and the password it has now."""
    if not isinstance(bolt_server, EmbeddedServer | Neo4jServer):
        pytest.skip("changes a user's password: needs a server this process started")
    first, second = PLANTED_SECRETS  # the secret watch looks for both
    bolt_server.create_user("rotator", first)
    current = {"user": "rotator", "password": first, "next": second}
    try:
        yield bolt_server, current
    finally:
        bolt_server.drop_user("rotator")


async def test_credentials_rotation_new_drivers_use_the_new_password(
    rotating_user: tuple[EmbeddedServer | Neo4jServer, dict[str, str]],
    bolt_config: Neo4jConnectionConfig,
) -> None:
    server, current = rotating_user
    asked = 0

    async def credentials() -> tuple[str, str]:
        nonlocal asked
        asked += 1
        return (current["user"], current["password"])

    b = Broker(
        bolt_config.replace(
            username="nobody", password="", credentials=credentials, pool_min_size=0
        )
    )
    async with b.borrow() as conn:
        before = conn.driver
        assert await query(conn) == 1
    old_password = current["password"]
    await asyncio.to_thread(server.set_user_password, "rotator", current["next"])
    current["password"] = current["next"]
    # The server really changed: the old password is refused now.
    async with neo4j.AsyncGraphDatabase.driver(server.uri, auth=("rotator", old_password)) as d:
        with pytest.raises(neo4j.exceptions.AuthError):
            await d.verify_connectivity()
    b.drain()
    async with b.borrow(timeout=10) as conn:
        assert conn.driver is not before
        assert await query(conn, 2) == 2
    assert asked == 2, "evaluated once for each new driver"
    await eventually(lambda: before._closed)  # type: ignore[attr-defined]
    await b.aclose()


async def test_auth_manager_per_driver_through_credentials(
    rotating_user: tuple[EmbeddedServer | Neo4jServer, dict[str, str]],
    bolt_config: Neo4jConnectionConfig,
) -> None:
    server, current = rotating_user
    managers: list[Any] = []

    async def provider() -> tuple[str, str]:
        await asyncio.sleep(0.05)  # long enough for drivers of several loops to overlap
        return (current["user"], current["password"])

    def new_manager() -> Any:
        managers.append(AsyncAuthManagers.basic(provider))
        return managers[-1]

    b = Broker(bolt_config.replace(credentials=new_manager, pool_min_size=0, pool_max_size=2))

    async def two_queries() -> int:
        async def one(i: int) -> int:
            async with b.borrow(timeout=10) as conn:
                return await query(conn, i)

        return sum(await asyncio.gather(one(1), one(2)))

    threads: list[threading.Thread] = []
    sums: list[int] = []
    for n in range(3):  # three loops at once, each with two drivers and two managers
        threads.append(in_thread(lambda: sums.append(asyncio.run(two_queries())), f"auth-{n}"))
    for thread in threads:
        await asyncio.to_thread(thread.join)
    assert sums == [3, 3, 3]
    assert len(managers) == 6, "one manager for each driver"
    await asyncio.to_thread(server.set_user_password, "rotator", current["next"])
    current["password"] = current["next"]
    b.drain()
    assert await two_queries() == 3  # new drivers, new managers, the new password
    await b.aclose()


def test_one_auth_manager_cannot_serve_drivers_of_several_loops(bolt_server: BoltServer) -> None:
    """Why driver_options refuses an auth manager: it belongs to the loop that locks it first."""

    async def provider() -> tuple[str, str]:
        await asyncio.sleep(0.3)
        return bolt_server.auth

    shared = AsyncAuthManagers.basic(provider)
    start = threading.Barrier(3)
    outcomes: list[str] = []

    def one_loop() -> None:
        async def verify() -> str:
            start.wait()
            driver = neo4j.AsyncGraphDatabase.driver(bolt_server.uri, auth=shared)
            try:
                await asyncio.wait_for(driver.verify_connectivity(), 3)
                return "ok"
            except Exception as exc:
                return type(exc).__name__
            finally:
                await driver.close()

        outcomes.append(asyncio.run(verify()))

    threads = [in_thread(one_loop, f"shared-{n}") for n in range(3)]
    for thread in threads:
        thread.join()
    assert sorted(outcomes) != ["ok", "ok", "ok"], outcomes
    with pytest.raises(ValueError, match="auth manager cannot be shared"):
        Neo4jConnectionConfig(password="x", driver_options={"auth": shared})


# -- max_borrows ---------------------------------------------------------------------------


async def test_max_borrows_replaces_a_driver_after_so_many_borrows(
    make_broker: MakeBroker,
) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1, max_borrows=3)
    seen = []
    for i in range(7):
        async with b.borrow() as conn:
            seen.append(conn.driver)
            assert await query(conn, i) == i
    assert seen[0] is seen[1] is seen[2]
    assert seen[3] is seen[4] is seen[5] and seen[3] is not seen[0]
    assert seen[6] is not seen[3]
    await eventually(lambda: here(b).snapshot()["closed"] == 2)
    assert here(b).snapshot()["created"] == 3
    assert seen[0]._closed and seen[3]._closed  # type: ignore[attr-defined]


# -- hooks ---------------------------------------------------------------------------------


async def test_on_create_runs_once_per_driver_before_its_first_borrow(
    make_broker: MakeBroker,
) -> None:
    prepared: list[neo4j.AsyncDriver] = []

    async def on_create(driver: neo4j.AsyncDriver) -> None:
        records, _, _ = await driver.execute_query("RETURN 41 + 1 AS answer")
        assert records[0]["answer"] == 42
        prepared.append(driver)

    b = make_broker(pool_min_size=0, pool_max_size=2, on_create=on_create)

    async def use() -> None:
        async with b.borrow() as conn:
            assert conn.driver in prepared, "handed out before on_create ran"
            await query(conn)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(use() for _ in range(6)))
    for _ in range(3):
        await use()
    assert len(prepared) == len(set(map(id, prepared))) == here(b).snapshot()["created"] == 2


async def test_failing_on_create_discards_the_driver_and_counts_the_error(
    make_broker: MakeBroker,
) -> None:
    made: list[neo4j.AsyncDriver] = []
    calls = 0

    async def on_create(driver: neo4j.AsyncDriver) -> None:
        nonlocal calls
        calls += 1
        made.append(driver)
        if calls == 1:
            raise RuntimeError("schema setup failed")

    b = make_broker(pool_min_size=0, pool_max_size=1, on_create=on_create)
    with pytest.raises(RuntimeError, match="schema setup failed"):
        await b.borrow(timeout=10)
    async with b.borrow(timeout=10) as conn:
        assert conn.driver is made[1]
        assert await query(conn) == 1
    assert made[0]._closed  # type: ignore[attr-defined]
    stats = here(b).snapshot()
    assert stats["hook_errors"] == 1 and stats["errors"] == 1 and stats["created"] == 1


async def test_on_return_runs_on_return_and_a_failure_means_check_or_discard(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        fail = False
        returned: list[neo4j.AsyncDriver] = []

        async def on_return(driver: neo4j.AsyncDriver) -> None:
            returned.append(driver)
            if fail:
                raise RuntimeError("reset failed")

        b = make_broker(
            uri=proxy.uri,
            pool_min_size=0,
            pool_max_size=1,
            on_return=on_return,
            health_check_timeout=2.0,
            connection_timeout=1.0,
            connection_acquisition_timeout=2.0,
        )
        async with b.borrow() as conn:
            first = conn.driver
            await query(conn)
        async with b.borrow() as conn:
            assert conn.driver is first, "hook passed: kept"
        assert returned == [first]  # the second return's hook may still run
        await eventually(lambda: len(returned) == 2 and here(b).snapshot()["available"] == 1)
        fail = True
        async with b.borrow() as conn:
            assert conn.driver is first
        # The hook failed; the server answers: verified and kept.
        await eventually(lambda: here(b).snapshot()["available"] == 1)
        stats = here(b).snapshot()
        assert stats["hook_errors"] == 1 and stats["drivers_lost"] == 0
        async with b.borrow() as conn:
            assert conn.driver is first
            proxy.refuse()
            proxy.reset_all()
        # The hook failed and the server is gone: discarded.
        await eventually(lambda: here(b).snapshot()["drivers_lost"] == 1)
        stats = here(b).snapshot()
        assert stats["hook_errors"] == 2 and stats["total"] == 0
        await eventually(lambda: first._closed)  # type: ignore[attr-defined]


async def test_reconnect_failed_is_called_and_the_pool_keeps_trying(
    make_broker: MakeBroker,
) -> None:
    calls: list[dict[str, Any]] = []
    with FaultProxy("127.0.0.1", 9) as proxy:
        proxy.refuse()
        b = make_broker(
            uri=proxy.uri,
            pool_min_size=1,
            reconnect_timeout=1.0,
            reconnect_failed=calls.append,
            connection_timeout=1.0,
        )
        with pytest.raises(neo4j.exceptions.ServiceUnavailable):
            await b.wait(timeout=10)
        await eventually(lambda: len(calls) >= 1, timeout=10, what="reconnect_failed called")
        await eventually(lambda: here(b).snapshot()["connect_errors"] >= 2, timeout=10)
    assert calls[0]["loop"] == here(b).key and calls[0]["min_size"] == 1
    assert calls[0]["last_error"].startswith("ServiceUnavailable")


# -- stats ---------------------------------------------------------------------------------


async def test_pop_stats_counts_known_work_and_resets_only_its_view(
    make_broker: MakeBroker,
) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=2)

    async def hold(seconds: float) -> None:
        async with b.borrow() as conn:
            await query(conn)
            await asyncio.sleep(seconds)

    b.pop_stats()  # a clean start
    await asyncio.gather(*(hold(0.1) for _ in range(4)))  # 2 drivers: all four queue
    (first,) = b.pop_stats().values()
    assert first["borrows"] == 4 and first["requests_queued"] == 4
    assert first["usage_ms"] >= 400 and first["wait_ms"] >= 100
    assert first["wait_max_ms"] >= 100 and first["connect_ms"] > 0
    assert first["connect_errors"] == first["returns_bad"] == first["drivers_lost"] == 0
    for _ in range(3):
        await hold(0.0)  # idle drivers: served at once
    with pytest.raises(neo4j.exceptions.ClientError):
        async with b.borrow() as conn:
            await conn.driver.execute_query("THIS IS NOT CYPHER")
    (second,) = b.pop_stats().values()
    assert second["borrows"] == 4 and second["requests_queued"] == 0
    assert second["wait_ms"] == 0 and second["wait_max_ms"] == 0
    assert second["usage_ms"] < first["usage_ms"] and second["connect_ms"] == 0
    (third,) = b.pop_stats().values()
    assert third["borrows"] == 0 and third["usage_ms"] == 0
    # Everything else keeps counting from the start.
    stats = here(b).snapshot()
    assert stats["borrows"] == 8 and stats["wait_max_ms"] >= 100
    assert b.totals()["borrows"] == 8


def test_pop_stats_of_a_parked_loop_and_of_the_default_broker(
    bolt_config: Neo4jConnectionConfig,
) -> None:
    broker.configure(bolt_config.replace(pool_min_size=0))

    async def once() -> None:
        async with broker.borrow() as conn:
            await query(conn)

    def persistent_loop() -> None:
        for _ in range(3):
            broker.run(once())

    in_thread(persistent_loop, "parked").join()
    (entry,) = broker.pop_stats().values()  # that loop is not running: read here
    assert entry["thread"] == "parked" and entry["borrows"] == 3
    assert entry["loop_running"] is False
    (entry,) = broker.pop_stats().values()
    assert entry["borrows"] == 0
    assert broker.totals()["borrows"] == 3
    broker.runner.shutdown(timeout=10)


async def test_module_functions_reach_the_default_broker(
    bolt_config: Neo4jConnectionConfig,
) -> None:
    broker.configure(bolt_config.replace(pool_min_size=1, pool_max_size=2))
    await broker.wait(timeout=20)
    assert await broker.check() == 0
    broker.resize(2, 3)
    await eventually(lambda: here(broker.get_broker()).snapshot()["available"] == 2)
    broker.drain()
    await eventually(lambda: here(broker.get_broker()).snapshot()["generation"] == 1)
    await broker.aclose()


# -- logs ----------------------------------------------------------------------------------


async def test_new_events_are_logged_without_secrets(
    make_broker: MakeBroker, bolt_config: Neo4jConnectionConfig, secret_watch: SecretWatch
) -> None:
    events: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event))
        raise structlog.DropEvent  # never reaches the logging handlers the watch sees

    structlog.configure(processors=[keep], cache_logger_on_first_use=False)
    real = (bolt_config.username, bolt_config.password)
    # Two secrets in play: the planted password in the config, the real one
    # that credentials() hands each new driver.
    b = make_broker(
        pool_min_size=0,
        pool_max_size=1,
        max_waiting=1,
        password=PLANTED_SECRETS[1],
        credentials=lambda: real,
    )
    held = await b.borrow()
    waiting = asyncio.create_task(b.borrow(timeout=5).__aenter__())
    await eventually(lambda: here(b).snapshot()["waiting"] == 1)
    with pytest.raises(TooManyWaiters):
        await b.borrow()
    b.resize(0, 1)
    b.drain()
    await held.release()
    await (await waiting).release()
    await eventually(lambda: here(b).snapshot()["generation"] == 1)
    names = {e["event"] for e in events}
    assert {"borrow.rejected", "broker.resize", "broker.drain", "pool.drained"} <= names
    secrets = secret_watch.secrets()
    assert PLANTED_SECRETS[1] in secrets
    for event in events:
        text = repr(event)
        secret_watch.check(text, f"event {event['event']}")
        assert not any(s in text for s in secrets), f"a secret in {event['event']}"


def counting_checks(calls: list[str]) -> Callable[[Neo4jConnectionConfig], neo4j.AsyncDriver]:
    """The default factory, with each driver's ``verify_connectivity`` counted."""

    def factory(config: Neo4jConnectionConfig) -> neo4j.AsyncDriver:
        driver = default_driver_factory(config)
        verify = driver.verify_connectivity

        async def counted(**kwargs: Any) -> None:
            calls.append("verify")
            await verify(**kwargs)

        driver.verify_connectivity = counted  # type: ignore[method-assign]
        return driver

    return factory


async def test_verify_on_create_off_leaves_the_check_to_the_first_query(
    make_broker: MakeBroker,
) -> None:
    calls: list[str] = []
    b = make_broker(
        pool_min_size=1,
        pool_max_size=3,
        verify_on_create=False,
        driver_factory=counting_checks(calls),
    )
    await b.wait(timeout=30)
    assert calls == ["verify"], "a driver made for the minimum is still verified"
    async with b.borrow() as one, b.borrow() as two, b.borrow() as three:
        assert [await query(c, n) for n, c in enumerate((one, two, three))] == [0, 1, 2]
    assert calls == ["verify"], "drivers made for borrowers were not verified on creation"
    assert here(b).snapshot()["created"] == 3

    calls.clear()
    checked = make_broker(pool_min_size=0, pool_max_size=1, driver_factory=counting_checks(calls))
    async with checked.borrow() as conn:
        await query(conn)
    assert calls == ["verify"], "on by default"


async def test_verify_on_create_off_a_dead_server_shows_in_the_first_query(
    make_broker: MakeBroker,
) -> None:
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    b = make_broker(
        uri=f"bolt://127.0.0.1:{port}",
        pool_min_size=0,
        pool_max_size=1,
        verify_on_create=False,
        max_transaction_retry_time=0,  # the query's own retries are not what is tested
    )
    for _ in range(2):
        with pytest.raises(neo4j.exceptions.ServiceUnavailable):
            async with b.borrow(timeout=10) as conn:
                await query(conn)
    stats = here(b).snapshot()
    assert stats["returns_bad"] == 2, "each failed query sent its driver back to be checked"
    await eventually(lambda: here(b).snapshot()["total"] == 0)  # no broken driver kept
