"""The loop-safe driver (``broker.driver()``) against one hand-kept ``AsyncDriver``.

Both sides run in the same loop, round after round, alternating, so the
ratios compare like with like on a machine that is doing other things:

- ``gather32``: 32 sessions at once on one loop, each running one query.
  Drivers, sockets to the server, and client CPU per query. By hand, one
  driver serves them all (its own socket pool); the loop-safe driver lends
  pooled drivers, ``sessions_per_driver`` sessions each. The same gather with
  other ``sessions_per_driver`` values is reported too: it is how the
  default was chosen.
- ``execute_query``: one query after another, ``execute_query`` each time:
  client CPU per query. The loop-safe driver borrows and returns a driver
  for every call.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import neo4j

from benchmarks.scenarios import Check, Result, Row, base_config
from broker import Broker
from broker.testing import BoltServer
from broker.testing.sockets import open_connections

SESSIONS = 32
CAPS = (1, 4, 8, 16, 32)


async def _session_query(driver: neo4j.AsyncDriver) -> int:
    async with driver.session() as session:
        result = await session.run("RETURN 1 AS one")
        record = await result.single()
        assert record is not None
        return int(record["one"])


async def _gather(driver: neo4j.AsyncDriver) -> int:
    return sum(await asyncio.gather(*(_session_query(driver) for _ in range(SESSIONS))))


async def _sequential(driver: neo4j.AsyncDriver, count: int) -> int:
    done = 0
    for _ in range(count):
        records, _, _ = await driver.execute_query("RETURN 1 AS one")
        done += records[0]["one"]
    return done


async def _cpu(job: Callable[[], Awaitable[int]]) -> tuple[int, float]:
    cpu = time.thread_time()
    done = await job()
    return done, time.thread_time() - cpu


async def _side_by_side(server: BoltServer, rounds: int, queries: int, cap: int) -> dict[str, Any]:
    config = base_config(server, pool_min_size=0, sessions_per_driver=cap)
    port = urllib.parse.urlsplit(server.uri).port or 7687
    b = Broker(config)
    loop_safe = b.driver()
    hand = neo4j.AsyncGraphDatabase.driver(config.uri, **config.driver_kwargs())
    cpu: dict[str, list[float]] = {
        "hand gather": [],
        "safe gather": [],
        "hand eq": [],
        "safe eq": [],
    }
    try:
        base = open_connections(port)
        await _gather(hand)  # warm: sockets open on both sides
        hand_sockets = open_connections(port) - base
        await _gather(loop_safe)
        safe_sockets = open_connections(port) - base - hand_sockets
        for _ in range(rounds):
            for name, driver in (("hand", hand), ("safe", loop_safe)):
                done, seconds = await _cpu(lambda d=driver: _gather(d))
                cpu[f"{name} gather"].append(seconds / done)
                done, seconds = await _cpu(lambda d=driver: _sequential(d, queries))
                cpu[f"{name} eq"].append(seconds / done)
        safe_drivers = b.totals()["created"]
    finally:
        await hand.close()
        await b.aclose()
    return {
        "cpu": {name: statistics.median(values) * 1e6 for name, values in cpu.items()},
        "hand_sockets": hand_sockets,
        "safe_drivers": safe_drivers,
        "safe_sockets": safe_sockets,
    }


def loop_safe(server: BoltServer, quick: bool) -> Result:
    """Rows and checks for the loop-safe driver (see the module docstring)."""
    rounds, queries = (2, 20) if quick else (15, 200)
    result = Result()
    default_cap = base_config(server).sessions_per_driver
    for cap in CAPS:
        seen = asyncio.run(_side_by_side(server, rounds if cap == default_cap else 3, 50, cap))
        result.rows.append(
            Row(
                "loop-safe",
                f"gather {SESSIONS} sessions, {cap} per driver",
                seen["cpu"]["safe gather"],
                "µs CPU/q",
                SESSIONS,
                seen["safe_drivers"],
            )
        )
    main = asyncio.run(_side_by_side(server, rounds, queries, default_cap))
    cpu = main["cpu"]
    result.rows += [
        Row(
            "loop-safe",
            f"gather {SESSIONS}: hand-kept driver",
            cpu["hand gather"],
            "µs CPU/q",
            SESSIONS,
            1,
        ),
        Row(
            "loop-safe",
            f"gather {SESSIONS}: loop-safe driver",
            cpu["safe gather"],
            "µs CPU/q",
            SESSIONS,
            main["safe_drivers"],
        ),
        Row("loop-safe", "execute_query: hand-kept driver", cpu["hand eq"], "µs CPU/q", queries, 1),
        Row(
            "loop-safe",
            "execute_query: loop-safe driver",
            cpu["safe eq"],
            "µs CPU/q",
            queries,
            main["safe_drivers"],
        ),
    ]
    result.checks += [
        Check(
            f"loop-safe gather {SESSIONS}: drivers, loop-safe / hand",
            main["safe_drivers"] / 1,
            "(reported)",
            True,
        ),
        Check(
            f"loop-safe gather {SESSIONS}: sockets, loop-safe / hand",
            main["safe_sockets"] / max(1, main["hand_sockets"]),
            "(reported)",
            True,
        ),
        Check(
            f"loop-safe gather {SESSIONS}: CPU/query, hand / loop-safe",
            cpu["hand gather"] / cpu["safe gather"],
            "(reported)",
            True,
        ),
    ]
    ratio = cpu["hand eq"] / cpu["safe eq"]
    result.checks.append(
        Check(
            "loop-safe execute_query: CPU/query, hand / loop-safe", ratio, ">= 0.95", ratio >= 0.95
        )
    )
    return result
