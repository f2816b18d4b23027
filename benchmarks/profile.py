"""Where a borrow goes: cProfile over borrow/release pairs and over loops that
start and stop an actor. No server needed (drivers that do no I/O).

Usage: ``python -m benchmarks.profile [pairs|loops] [--top N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from benchmarks.scenarios import _NoIODriver
from broker import Broker, Neo4jConnectionConfig

CONFIG = Neo4jConnectionConfig(uri="bolt://unused.invalid:7687", pool_max_size=1, pool_min_size=0)


def make_broker() -> Broker:
    return Broker(CONFIG, driver_factory=lambda _: _NoIODriver())  # type: ignore[arg-type,return-value]


async def pairs(count: int) -> float:
    b = make_broker()
    conn = await b.borrow()
    await conn.release()
    started = time.perf_counter()
    for _ in range(count):
        conn = await b.borrow()
        await conn.release()
    seconds = time.perf_counter() - started
    await b.aclose()
    return seconds / count * 1e6


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["pairs", "loops"], nargs="?", default="pairs")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    profiler = cProfile.Profile()
    if args.what == "pairs":
        print(f"{asyncio.run(pairs(20000)):.1f} µs per pair without the profiler")
        profiler.runcall(asyncio.run, pairs(20000))
    else:
        print(f"{loops(2000):.1f} µs per loop without the profiler")
        profiler.runcall(loops, 2000)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
