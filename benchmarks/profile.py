"""Where a borrow goes: cProfile over borrow/release pairs and over loops that
start and stop an actor. No server needed (drivers that do no I/O).

Usage: ``python -m benchmarks.profile [pairs|minimal|loops] [--borrowers N] [--hold] [--top N]``.
``pairs`` also times the minimal actor (:func:`benchmarks.mailboxes.minimal_pairs`)
in the same run, rounds interleaved, and prints the ratio; ``minimal`` profiles
that reference itself. Both then split a pair's time by area (janus, the
handle, the actor, the pool, logging, asyncio): each area's share of the
profiled own time, applied to the unprofiled time of a pair.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from typing import Any

from benchmarks.mailboxes import minimal_pairs
from benchmarks.scenarios import _NoIODriver
from broker import Broker, Neo4jConnectionConfig

SIZE = 10
CONFIG = Neo4jConnectionConfig(
    uri="bolt://unused.invalid:7687", pool_max_size=SIZE, pool_min_size=0
)
PAIRS = 20000


def make_broker() -> Broker:
    return Broker(CONFIG, driver_factory=lambda _: _NoIODriver())  # type: ignore[arg-type,return-value]


async def pairs(count: int, borrowers: int = 1, hold: bool = False) -> float:
    b = make_broker()
    held = [await b.borrow() for _ in range(SIZE)]  # the pool is full and warm
    for conn in held:
        await conn.release()
    per_worker = count // borrowers

    async def worker() -> None:
        for _ in range(per_worker):
            conn = await b.borrow()
            if hold:
                await asyncio.sleep(0)
            await conn.release()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(borrowers)))
    seconds = time.perf_counter() - started
    await b.aclose()
    return seconds / (per_worker * borrowers) * 1e6


async def minimal(count: int, borrowers: int = 1, hold: bool = False) -> float:
    done, seconds = await minimal_pairs(list(range(SIZE)), borrowers, count, hold)
    return seconds / done * 1e6


def loops(count: int) -> float:
    b = make_broker()

    async def once() -> None:
        async with b.borrow():
            pass

    started = time.perf_counter()
    for _ in range(count):
        asyncio.run(once())
    b.close()
    return (time.perf_counter() - started) / count * 1e6


#: Where a function's own time is counted, by the file it lives in (first match wins).
AREAS = (
    ("janus", "janus (the mailbox: put, get, size)"),
    ("broker/connection.py", "broker.connection (the handle, borrow and release)"),
    ("broker/actor.py", "broker.actor (posting, draining, handling)"),
    ("broker/pool.py", "broker.pool (decisions, counters)"),
    ("broker/histogram.py", "broker.pool (decisions, counters)"),
    ("broker/messages.py", "broker.messages"),
    ("broker/broker.py", "broker.broker (finding the loop's actor)"),
    ("broker/registry.py", "broker.broker (finding the loop's actor)"),
    ("broker/log.py", "broker.log and logging (level checks)"),
    ("logging/", "broker.log and logging (level checks)"),
    ("structlog", "broker.log and logging (level checks)"),
    ("asyncio", "asyncio (loop, futures, tasks)"),
    ("benchmarks/", "the benchmark's own loop"),
)


def by_area(stats: pstats.Stats, unprofiled_us: float, pairs: int) -> None:
    """Own time per area, scaled so that the areas add up to the unprofiled time of a pair."""
    totals: dict[str, float] = {}
    raw: Any = stats
    for (path, _, name), (_, _, own, _, _) in raw.stats.items():
        where = f"{path} {name}"
        area = next((label for key, label in AREAS if key in where), "builtins and the rest")
        if "_asyncio" in name or "get_running_loop" in name:
            area = "asyncio (loop, futures, tasks)"
        totals[area] = totals.get(area, 0.0) + own
    whole = sum(totals.values())
    print(f"\n{'area':<56}{'µs/pair':>9}{'share':>8}")
    for area, own in sorted(totals.items(), key=lambda item: -item[1]):
        share = own / whole
        print(f"{area:<56}{share * unprofiled_us:>9.2f}{share:>8.0%}")
    print(f"{'total (unprofiled)':<56}{unprofiled_us:>9.2f}   ({pairs} pairs profiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["pairs", "minimal", "loops"], nargs="?", default="pairs")
    parser.add_argument("--borrowers", type=int, default=1)
    parser.add_argument("--hold", action="store_true", help="hold each driver 1 loop turn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    profiler = cProfile.Profile()
    if args.what in ("pairs", "minimal"):
        broker_us: list[float] = []
        minimal_us: list[float] = []
        for _ in range(args.rounds):
            broker_us.append(asyncio.run(pairs(PAIRS, args.borrowers, args.hold)))
            minimal_us.append(asyncio.run(minimal(PAIRS, args.borrowers, args.hold)))
        ours, reference = statistics.median(broker_us), statistics.median(minimal_us)
        print(
            f"{args.borrowers} borrower(s), medians of {args.rounds} rounds without the profiler: "
            f"broker {ours:.2f} µs/pair, minimal actor {reference:.2f} µs/pair, "
            f"ratio {ours / reference:.2f}"
        )
        job = pairs if args.what == "pairs" else minimal
        profiler.runcall(asyncio.run, job(PAIRS, args.borrowers, args.hold))
        stats = pstats.Stats(profiler)
        by_area(stats, ours if args.what == "pairs" else reference, PAIRS)
    else:
        print(f"{loops(2000):.1f} µs per loop without the profiler")
        profiler.runcall(loops, 2000)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
