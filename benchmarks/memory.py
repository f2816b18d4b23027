"""What a loop's pool costs in memory, idle, and over 1,000 live loops.

Python's heap is measured exactly with tracemalloc, in a pass of its own:
what the loops allocated and still hold, so that garbage of an earlier
measurement freed meanwhile is not subtracted. RSS, which also holds what C
code and the allocator keep, in another pass without tracemalloc (which
costs memory itself). Each figure is a difference against the same work
without the broker, so what is left is the broker's.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.network import local
from benchmarks.scenarios import Check, Result, Row, _NoIODriver, _rss_kib
from broker import Broker
from broker.testing import BoltServer

#: The per-loop cost that is not a driver, in KiB: the target.
TARGET_KIB = 50


def _heap(fresh: bool = False) -> int:
    """Bytes of Python's heap held now; with ``fresh``, forget every block
    allocated so far first, so that only blocks allocated from here count."""
    gc.collect()
    if fresh:
        tracemalloc.clear_traces()
    return tracemalloc.get_traced_memory()[0]


def _live_loops(
    count: int, threads: int, start: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[], None]:
    """Start ``count`` loops on ``threads`` threads, each running ``start()`` once
    and then kept alive, not running. Returns what ends them all.
    """
    runners: list[list[asyncio.Runner]] = [[] for _ in range(threads)]

    def open_some(slot: int) -> None:
        for _ in range(count // threads):
            runner = asyncio.Runner()
            runner.run(start())
            runners[slot].append(runner)

    def close_some(slot: int) -> None:
        for runner in runners[slot]:
            runner.close()
        runners[slot].clear()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(open_some, range(threads)))

    def end() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(close_some, range(threads)))

    return end


def _measure(
    count: int,
    threads: int,
    start: Callable[[], Coroutine[Any, Any, None]],
    heap: bool,
) -> float:
    """Bytes (heap) or KiB (RSS) that ``count`` live loops hold, per loop."""
    gc.collect()
    before = _heap(fresh=True) if heap else _rss_kib()
    end = _live_loops(count, threads, start)
    gc.collect()
    after = _heap() if heap else _rss_kib()
    end()
    return (after - before) / count


def memory(server: BoltServer, quick: bool) -> Result:
    result = Result()
    threads = 8
    count = 80 if quick else 1000
    idle_loops = 8 if quick else 40
    network = local(server)
    real = Broker(network.config(pool_min_size=2, pool_max_size=2))
    fake = Broker(
        network.config(pool_min_size=2, pool_max_size=2),
        driver_factory=lambda _: _NoIODriver(),  # type: ignore[arg-type,return-value]
    )
    made = {"real": 0, "fake": 0}
    lock = threading.Lock()

    async def bare() -> None:
        await asyncio.sleep(0)

    def ready(b: Broker, key: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def start() -> None:
            await b.wait()  # pool_min_size drivers made and verified
            with lock:
                made[key] += 1

        return start

    # Warm up every path once, so that imports and first-use caches are not counted.
    _measure(threads, threads, bare, heap=False)
    _measure(threads, threads, ready(fake, "fake"), heap=False)
    _measure(threads, threads, ready(real, "real"), heap=False)
    figures: dict[str, float] = {}
    for heap in (False, True):
        kind = "heap" if heap else "rss"
        if heap:
            tracemalloc.start()
        try:
            figures[f"bare {kind}"] = _measure(count, threads, bare, heap)
            figures[f"fake {kind}"] = _measure(count, threads, ready(fake, "fake"), heap)
            figures[f"bare idle {kind}"] = _measure(idle_loops, 1, bare, heap)
            figures[f"real idle {kind}"] = _measure(idle_loops, 1, ready(real, "real"), heap)
        finally:
            if heap:
                tracemalloc.stop()
    totals = {"real": real.totals(), "fake": fake.totals()}
    real.close()
    fake.close()
    assert made["fake"] == 2 * count + threads, made
    assert made["real"] == 2 * idle_loops + threads, made
    assert totals["real"]["created"] == 2 * made["real"], totals
    kib = 1024
    # Heap per loop, in KiB: the loop alone, the broker's part without drivers
    # (actor, janus queue, pool state, two driver stand-ins of a few hundred
    # bytes), and an idle pool of two real drivers with their sockets.
    loop_heap = figures["bare heap"] / kib
    broker_heap = (figures["fake heap"] - figures["bare heap"]) / kib
    idle_heap = (figures["real idle heap"] - figures["bare idle heap"]) / kib
    loop_rss = figures["bare rss"]
    broker_rss = figures["fake rss"] - figures["bare rss"]
    idle_rss = figures["real idle rss"] - figures["bare idle rss"]
    where = f"{count} live loops on {threads} threads"
    result.rows += [
        Row("memory", f"{where}: an event loop alone, heap", loop_heap, "KiB/loop", count),
        Row("memory", f"{where}: an event loop alone, RSS", loop_rss, "KiB/loop", count),
        Row(
            "memory",
            f"{where}: broker without drivers (actor, janus, pool), heap",
            broker_heap,
            "KiB/loop",
            count,
            0,
        ),
        Row(
            "memory",
            f"{where}: broker without drivers (actor, janus, pool), RSS",
            broker_rss,
            "KiB/loop",
            count,
            0,
        ),
        Row(
            "memory",
            f"{idle_loops} idle pools at pool_min_size=2 real drivers, heap",
            idle_heap,
            "KiB/loop",
            idle_loops,
            2,
        ),
        Row(
            "memory",
            f"{idle_loops} idle pools at pool_min_size=2 real drivers, RSS",
            idle_rss,
            "KiB/loop",
            idle_loops,
            2,
        ),
    ]
    result.checks.append(
        Check(
            "memory: per loop, not the drivers, heap (KiB)",
            broker_heap,
            f"<= {TARGET_KIB}",
            broker_heap <= TARGET_KIB,
        )
    )
    result.checks.append(
        Check(
            "memory: per loop, not the drivers, RSS (KiB)",
            broker_rss,
            f"<= {TARGET_KIB}",
            broker_rss <= TARGET_KIB,
        )
    )
    return result
