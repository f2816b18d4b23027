"""Where the broker's extra CPU per query goes, in the overhead scenario's
"workers" case: the same queries by hand and through the broker, counted and
timed function by function.

Usage: ``python -m benchmarks.per_query [--borrowers 32] [--queries 1600] [--rounds 5] [--top 25]``.

Calls per query are exact: each side runs under cProfile twice, with
``queries`` and twice as many, and the difference of the two runs is divided
by ``queries`` (start-up, warm-up and shutdown cancel out). CPU per query
(``thread_time``) comes from unprofiled runs, the sides interleaved round by
round, medians, with two variants of the broker's side: each worker holding
one driver for all its queries (no pair a query) and two pairs a query, so
that one pair's cost between real queries is a difference of two runs. Own
time per function under the profiler is scaled to the unprofiled CPU of each
side (noisy: compare calls first). The tight loop of ``benchmarks.profile``
(32 borrowers) is counted the same way, per pair, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import pstats
import statistics
import time
from typing import Any

from benchmarks import profile as tight
from benchmarks.network import local
from benchmarks.scenarios import _hand_managed, _through_broker
from broker import Broker, Neo4jConnectionConfig
from broker.testing import server_from_env
from broker.testing.selection import bench_server

#: Where a function is counted, by its file or name (first match wins).
AREAS = (
    ("broker/", "broker"),
    ("janus", "janus"),
    ("neo4j/", "neo4j driver"),
    ("selectors", "selector (epoll)"),
    ("select.epoll", "selector (epoll)"),
    ("asyncio", "asyncio (loop, futures, tasks)"),
    ("_asyncio", "asyncio (loop, futures, tasks)"),
    ("get_running_loop", "asyncio (loop, futures, tasks)"),
    ("logging/", "logging"),
    ("socket", "sockets"),
    ("ssl", "sockets"),
    ("benchmarks/", "the benchmark's own code"),
)

Counts = dict[tuple[str, int, str], tuple[int, float]]


def area(key: tuple[str, int, str]) -> str:
    where = f"{key[0]} {key[2]}"
    return next((label for k, label in AREAS if k in where), "builtins and the rest")


def label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{short}:{line}({name})"


async def _variant(b: Broker, borrowers: int, queries: int, pairs: int) -> tuple[int, float, float]:
    """The broker's side with ``pairs`` borrow+release pairs per query, not one.

    0: each worker borrows once and runs all its queries on that driver;
    2: one more pair, with nothing in it, before each query.
    """
    done = 0

    async def worker() -> None:
        nonlocal done
        held = await b.borrow() if pairs == 0 else None
        for _ in range(queries // borrowers):
            if pairs == 2:
                async with b.borrow():
                    pass
            if held is None:
                async with b.borrow() as conn:
                    records, _, _ = await conn.driver.execute_query("RETURN 1 AS one")
            else:
                records, _, _ = await held.driver.execute_query("RETURN 1 AS one")
            done += records[0]["one"]
        if held is not None:
            await held.release()

    async def warm() -> None:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")

    await asyncio.gather(*(warm() for _ in range(borrowers)))
    started, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(worker() for _ in range(borrowers)))
    return done, time.perf_counter() - started, time.thread_time() - cpu


#: The sides: by hand, through the broker as ``make bench`` does, and two variants.
SIDES = {
    "hand": "by hand",
    "broker": "broker, 1 pair a query (make bench)",
    "held": "broker, 1 pair a worker (driver held)",
    "two": "broker, 2 pairs a query",
}


def run_side(side: str, config: Neo4jConnectionConfig, borrowers: int, queries: int) -> Any:
    if side == "hand":
        return asyncio.run(_hand_managed(config, borrowers, queries))
    b = Broker(config)
    try:
        if side == "broker":
            return asyncio.run(_through_broker(b, borrowers, queries))
        return asyncio.run(_variant(b, borrowers, queries, 0 if side == "held" else 2))
    finally:
        b.close()


class GcClock:
    """Collections per generation and the CPU they take, while timing runs."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = 0.0
        self._started = 0.0
        self.on = False

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.count[info["generation"]] += 1
            self.seconds += time.thread_time() - self._started


def profiled(side: str, config: Neo4jConnectionConfig, borrowers: int, queries: int) -> Counts:
    profiler = cProfile.Profile()
    profiler.runcall(run_side, side, config, borrowers, queries)
    raw: Any = pstats.Stats(profiler)
    return {key: (calls, own) for key, (_, calls, own, _, _) in raw.stats.items()}


def tight_pairs(pairs: int) -> Counts:
    """Calls and own time in ``benchmarks.profile``'s tight loop, 32 borrowers."""
    profiler = cProfile.Profile()
    profiler.runcall(asyncio.run, tight.pairs(pairs, 32))
    raw: Any = pstats.Stats(profiler)
    return {key: (calls, own) for key, (_, calls, own, _, _) in raw.stats.items()}


def per_query(small: Counts, large: Counts, queries: int) -> Counts:
    """The second run minus the first, per query: what one more query costs."""
    out: Counts = {}
    for key in set(small) | set(large):
        c0, t0 = small.get(key, (0, 0.0))
        c1, t1 = large.get(key, (0, 0.0))
        out[key] = ((c1 - c0) / queries, (t1 - t0) / queries)  # type: ignore[assignment]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--borrowers", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    logging.getLogger("neo4j").setLevel(logging.ERROR)
    n = args.queries // args.borrowers * args.borrowers
    external = server_from_env()
    server = external or bench_server().start()
    try:
        config = local(server).config(pool_max_size=args.borrowers, pool_min_size=0)
        cpu: dict[str, list[float]] = {side: [] for side in SIDES}
        clocks = {side: GcClock() for side in SIDES}
        for clock in clocks.values():
            gc.callbacks.append(clock)
        for _ in range(args.rounds):
            for side in cpu:
                clocks[side].on = True
                done, _, seconds = run_side(side, config, args.borrowers, n)
                clocks[side].on = False
                assert done == n, (side, done)
                cpu[side].append(seconds / n * 1e6)
        for clock in clocks.values():
            gc.callbacks.remove(clock)
        unprofiled = {side: statistics.median(got) for side, got in cpu.items()}
        runs = args.rounds * n

        def paired(side: str, other: str) -> float:
            """Median of the per-round differences (the sides run interleaved)."""
            return statistics.median(a - b for a, b in zip(cpu[side], cpu[other], strict=True))

        print(f"CPU per query, medians of {args.rounds} rounds of {n} queries, no profiler:")
        for side, title in SIDES.items():
            clock = clocks[side]
            gens = "/".join(f"{c / runs * 1000:.1f}" for c in clock.count)
            print(
                f"  {title:<40}{unprofiled[side]:>7.1f} µs  (rounds: "
                + ", ".join(f"{v:.0f}" for v in cpu[side])
                + f"); gc {clock.seconds / runs * 1e6:.1f} µs, "
                f"collections per 1000 queries by generation {gens} (whole run)"
            )
        print(
            "paired medians of the per-round differences: "
            f"broker - hand {paired('broker', 'hand'):+.1f} µs, "
            f"held - hand {paired('held', 'hand'):+.1f} µs, "
            f"one pair in situ: broker - held {paired('broker', 'held'):+.1f} µs, "
            f"2 pairs - 1 pair {paired('two', 'broker'):+.1f} µs\n"
        )
        counted = {
            side: per_query(
                profiled(side, config, args.borrowers, n),
                profiled(side, config, args.borrowers, 2 * n),
                n,
            )
            for side in ("hand", "broker")
        }
    finally:
        if external is None:
            server.stop()
    counted["tight"] = per_query(tight_pairs(20000), tight_pairs(40000), 20000)
    scale = {
        side: unprofiled[side] / (sum(t for _, t in counted[side].values()) * 1e6)
        for side in ("hand", "broker")
    }
    print(
        f"{args.borrowers} borrowers, {n} queries a run; CPU per query without the profiler "
        f"(medians of {args.rounds} rounds): by hand {unprofiled['hand']:.1f} µs, "
        f"broker {unprofiled['broker']:.1f} µs, "
        f"difference {unprofiled['broker'] - unprofiled['hand']:.1f} µs"
    )

    def us(side: str, t: float) -> float:
        return t * 1e6 * scale[side]

    areas: dict[str, dict[str, list[float]]] = {}
    for side, got in counted.items():
        for key, (calls, own) in got.items():
            row = areas.setdefault(area(key), {s: [0.0, 0.0] for s in ("hand", "broker", "tight")})
            row[side][0] += calls
            row[side][1] += us(side, own) if side in scale else 0.0
    print(
        "calls per query (exact) and own µs per query (profiled, scaled; noisy), "
        "and calls per pair in the tight loop of benchmarks.profile, 32 borrowers"
    )
    print(f"{'area':<34}{'calls':>9}{'calls':>9}{'µs':>8}{'µs':>8}{'Δ µs':>8}{'tight':>9}")
    print(f"{'':<34}{'hand':>9}{'broker':>9}{'hand':>8}{'broker':>8}{'':>8}{'calls':>9}")
    for name, row in sorted(areas.items(), key=lambda kv: kv[1]["hand"][1] - kv[1]["broker"][1]):
        h, b, t = row["hand"], row["broker"], row["tight"]
        print(
            f"{name:<34}{h[0]:>9.2f}{b[0]:>9.2f}{h[1]:>8.1f}{b[1]:>8.1f}{b[1] - h[1]:>8.1f}"
            f"{t[0]:>9.2f}"
        )

    for key in sorted(counted["tight"], key=lambda k: -counted["tight"][k][0]):
        if "_run_once" in key[2] or key[2] == "select":
            print(f"loop turns, {label(key)}: ", end="")
            print(", ".join(f"{s} {counted[s].get(key, (0, 0.0))[0]:.2f}" for s in counted))
    keys = set(counted["hand"]) | set(counted["broker"])

    def delta(key: tuple[str, int, str]) -> tuple[float, float]:
        hc, ht = counted["hand"].get(key, (0, 0.0))
        bc, bt = counted["broker"].get(key, (0, 0.0))
        return bc - hc, us("broker", bt) - us("hand", ht)

    print(f"\nfunctions whose calls per query differ most (top {args.top})")
    print(f"{'calls hand':>11}{'broker':>9}{'Δ µs':>8}  function")
    for key in sorted(keys, key=lambda k: -abs(delta(k)[0]))[: args.top]:
        hc = counted["hand"].get(key, (0, 0.0))[0]
        bc = counted["broker"].get(key, (0, 0.0))[0]
        print(f"{hc:>11.2f}{bc:>9.2f}{delta(key)[1]:>8.2f}  {label(key)}")
    print(f"\nfunctions whose own time per query differs most (top {args.top})")
    for key in sorted(keys, key=lambda k: -abs(delta(k)[1]))[: args.top]:
        hc = counted["hand"].get(key, (0, 0.0))[0]
        bc = counted["broker"].get(key, (0, 0.0))[0]
        print(f"{hc:>11.2f}{bc:>9.2f}{delta(key)[1]:>8.2f}  {label(key)}")


if __name__ == "__main__":
    main()
