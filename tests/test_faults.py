"""Faults against the real server, each under load from several threads x loops.

- the server is killed (SIGKILL) and restarted on the same port;
- a blackhole: connections stay open and nothing answers;
- every connection is reset, again and again, during queries;
- handshakes are slow: new drivers take seconds to connect.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import neo4j
import pytest

from broker import Broker, Neo4jConnectionConfig
from broker.testing import BoltServer, EmbeddedServer
from broker.testing.faults import FaultProxy
from tests.helpers import bolt_port, eventually
from tests.load import Load, cross_loop_errors, errors_by_type, recovery_seconds

pytestmark = pytest.mark.slow

# Errors a borrower may see while the server is unreachable: the driver's own,
# and the broker's BorrowTimeout. Anything else is a bug.
EXPECTED = {
    "ServiceUnavailable",
    "SessionExpired",
    "BorrowTimeout",
    "TimeoutError",
    "IncompleteCommit",
}

FAST_FAIL = {
    "borrow_timeout": 2.0,
    "connection_timeout": 1.0,
    "connection_acquisition_timeout": 2.0,
    "max_transaction_retry_time": 1.0,
    "health_check_interval": 0.2,
    "health_check_timeout": 1.0,
    "pool_max_size": 3,
    "pool_min_size": 0,
}


def config_for(uri: str, auth: tuple[str, str], **changes: Any) -> Neo4jConnectionConfig:
    return Neo4jConnectionConfig(uri=uri, username=auth[0], password=auth[1]).replace(
        **{**FAST_FAIL, **changes}
    )


def summary(name: str, outcomes: list[Any], since: float | None = None) -> None:
    """One line of figures for docs/reliability.md (shown with pytest -s)."""
    ok = sum(1 for o in outcomes if o.error is None)
    recovered = recovery_seconds(outcomes, since) if since is not None else None
    back = f", recovered {recovered:.2f} s after the fault ended" if recovered is not None else ""
    print(
        f"\n{name}: {len(outcomes)} attempts, {ok} ok, errors {dict(errors_by_type(outcomes))}, "
        f"longest {max(o.seconds for o in outcomes):.2f} s{back}"
    )


def assert_only_expected_errors(outcomes: list[Any]) -> None:
    assert cross_loop_errors(outcomes) == []
    unexpected = {e: n for e, n in errors_by_type(outcomes).items() if e not in EXPECTED}
    assert unexpected == {}, unexpected


async def test_server_killed_and_restarted_mid_load(restartable_server: EmbeddedServer) -> None:
    server = restartable_server
    config = config_for(server.uri, server.auth)
    b = Broker(config)
    load = Load(b, threads=3, concurrency=4, loop_seconds=2.0, query_timeout=3.0).start()
    await asyncio.sleep(1.5)
    server.kill()
    await asyncio.sleep(2.0)
    await asyncio.to_thread(server.restart)
    back = time.monotonic()
    await asyncio.sleep(6.0)
    outcomes = load.stop()
    summary("kill -9 and restart", outcomes, back)

    assert_only_expected_errors(outcomes)
    assert errors_by_type(outcomes), "the outage was felt"
    # Nobody waited longer than the borrow timeout plus the query's own timeout.
    longest = max(o.seconds for o in outcomes)
    assert longest <= config.borrow_timeout + 3.0 + 1.0, longest
    recovered = recovery_seconds(outcomes, back)
    assert recovered is not None and recovered <= 4.0, f"success came back after {recovered} s"
    late = [o for o in outcomes if o.started >= back + 4.0]
    assert late and all(o.error is None for o in late), "100% success once recovered"
    totals = b.totals()
    assert totals["discarded"] >= 1, "broken drivers were discarded, not handed out again"
    assert totals["created"] == totals["closed"], "every loop closed what it made"
    b.close()


async def test_blackhole_ends_in_errors_within_timeouts(bolt_server: BoltServer) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        config = config_for(proxy.uri, bolt_server.auth, borrow_timeout=1.0)
        b = Broker(config)
        # Each loop outlives the connect and check timeouts (1 to 2 s), so jobs
        # caught in the hole fail in their loop rather than being cancelled
        # when it ends (a cancelled job is not a failure).
        load = Load(b, threads=3, concurrency=3, loop_seconds=3.0, query_timeout=1.0).start()
        await asyncio.sleep(1.0)
        proxy.blackhole()
        quiet_from = time.monotonic()
        await asyncio.sleep(4.0)
        proxy.pass_through()
        proxy.reset_all()  # connections stuck in the hole are cut
        back = time.monotonic()
        await asyncio.sleep(3.0)
        outcomes = load.stop(timeout=15)
        summary("blackhole", outcomes, back)

        assert_only_expected_errors(outcomes)
        # An attempt lasts at most borrow_timeout + query timeout (2 s): one that
        # starts 2 s before the hole ends has ended, in error, inside it.
        in_hole = [o for o in outcomes if quiet_from + 0.3 <= o.started <= back - 2.1]
        assert in_hole and all(o.error for o in in_hole), "nothing succeeds in a blackhole"
        longest = max(o.seconds for o in outcomes)
        assert longest <= config.borrow_timeout + 1.0 + 1.0, longest
        assert b.totals()["errors"] >= 1, "creations and checks failed rather than hung"
        recovered = recovery_seconds(outcomes, back)
        assert recovered is not None and recovered <= 2.5
        b.close()


async def test_resets_during_queries(bolt_server: BoltServer) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        config = config_for(proxy.uri, bolt_server.auth, pool_min_size=2, pool_max_size=4)
        b = Broker(config)
        load = Load(b, threads=3, concurrency=4, loop_seconds=1.5, query_timeout=2.0).start()

        async def here_worker(until: float) -> int:
            done = 0
            while time.monotonic() < until:
                try:
                    async with b.borrow() as conn:
                        await conn.driver.execute_query("RETURN 1")
                    done += 1
                except (neo4j.exceptions.ServiceUnavailable, neo4j.exceptions.SessionExpired):
                    pass
            return done

        until = time.monotonic() + 4.0
        workers = [asyncio.create_task(here_worker(until)) for _ in range(4)]
        resets = 0
        for _ in range(6):
            await asyncio.sleep(0.5)
            resets += proxy.reset_all()
        last_reset = time.monotonic()
        await asyncio.gather(*workers)
        await asyncio.sleep(2.0)
        outcomes = load.stop()
        summary(f"resets ({resets} connections reset)", outcomes, last_reset)

        assert resets > 0, "connections were really reset"
        assert_only_expected_errors(outcomes)
        late = [o for o in outcomes if o.started >= last_reset + 1.5]
        assert late and all(o.error is None for o in late)
        stats = await b.stats()
        mine = next(v for v in stats.values() if v["thread"] == "MainThread")
        assert mine["in_use"] == 0 and mine["waiting"] == 0
        actor = next(a for a in b.actors() if a.key == mine["loop"])
        await eventually(lambda: actor.snapshot()["available"] >= 2, what="the pool refilled")
        await b.aclose()


async def test_slow_handshakes_do_not_stall_other_borrowers(bolt_server: BoltServer) -> None:
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        config = config_for(
            proxy.uri,
            bolt_server.auth,
            pool_max_size=3,
            borrow_timeout=10.0,
            connection_timeout=5.0,
            connection_acquisition_timeout=5.0,
        )
        b = Broker(config)
        warm = [await b.borrow(), await b.borrow()]
        for conn in warm:
            await conn.release()
        proxy.delay_handshake(2.0)
        load = Load(b, threads=2, concurrency=2, loop_seconds=3.0).start()

        done = 0
        stop = asyncio.Event()

        async def cycle() -> None:
            nonlocal done
            while not stop.is_set():
                async with b.borrow() as conn:
                    await conn.driver.execute_query("RETURN 1")
                done += 1

        workers = [asyncio.create_task(cycle()) for _ in range(3)]  # the third needs a new driver
        actor = b.actors()[0]
        await eventually(lambda: actor.snapshot()["creating"] == 1, what="a slow creation runs")
        started, served_before = time.monotonic(), done
        asked = time.monotonic()
        await b.stats()
        stats_latency = time.monotonic() - asked
        await asyncio.sleep(1.0)
        served_during = done - served_before
        still_creating = actor.snapshot()["creating"] == 1 and time.monotonic() - started < 2.0
        stop.set()
        await asyncio.gather(*workers)
        outcomes = load.stop()

        print(
            f"\nslow handshakes: {served_during} borrows served in 1 s while a driver was "
            f"being created; stats answered in {stats_latency * 1000:.1f} ms"
        )
        assert still_creating, "the window measured was inside the slow creation"
        assert served_during >= 10, f"only {served_during} borrows served during the creation"
        assert stats_latency < 0.5
        assert_only_expected_errors(outcomes)
        assert any(o.error is None for o in outcomes), "other loops made progress too"
        await b.aclose()
