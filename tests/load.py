"""Continuous load from several threads x event loops, recording every outcome.

Each thread runs a series of short-lived loops (``asyncio.run``); each loop
runs ``concurrency`` workers that borrow, run one query and release, over
and over. Every attempt is recorded with its start, end and error type, so
fault tests can say how long anything waited, which errors came, and when
success returned.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from broker import Broker

CROSS_LOOP = "attached to a different loop"


@dataclass(frozen=True, slots=True)
class Outcome:
    started: float
    ended: float
    error: str | None  # exception type name, None on success
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Load:
    """Start with :meth:`start`, stop with :meth:`stop`, then read :attr:`outcomes`."""

    def __init__(
        self,
        broker: Broker,
        threads: int = 3,
        concurrency: int = 4,
        loop_seconds: float = 0.5,
        query_timeout: float = 2.0,
        pause: float = 0.0,
    ) -> None:
        self.broker = broker
        self.concurrency = concurrency
        self.loop_seconds = loop_seconds
        self.query_timeout = query_timeout
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self.loops_run = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._thread_main, name=f"load-{i}") for i in range(threads)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> list[Outcome]:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        if hung:
            raise AssertionError(f"load threads still running {timeout} s after stop: {hung}")
        return self.outcomes

    def _thread_main(self) -> None:
        while not self._stop.is_set():
            try:
                asyncio.run(self._one_loop())
            except BaseException as exc:  # recorded: a loop must never die of the broker
                now = time.monotonic()
                self._record([Outcome(now, now, "loop:" + type(exc).__name__, repr(exc))])
            with self._lock:
                self.loops_run += 1

    async def _one_loop(self) -> None:
        until = time.monotonic() + self.loop_seconds
        results = await asyncio.gather(*(self._worker(until) for _ in range(self.concurrency)))
        self._record(o for batch in results for o in batch)

    async def _worker(self, until: float) -> list[Outcome]:
        done: list[Outcome] = []
        while time.monotonic() < until and not self._stop.is_set():
            started = time.monotonic()
            try:
                async with self.broker.borrow() as conn:
                    async with asyncio.timeout(self.query_timeout):
                        records, _, _ = await conn.driver.execute_query("RETURN 1 AS one")
                    assert records[0]["one"] == 1
                done.append(Outcome(started, time.monotonic(), None))
            except Exception as exc:
                done.append(Outcome(started, time.monotonic(), type(exc).__name__, str(exc)[:200]))
            if self.pause:
                await asyncio.sleep(self.pause)
        return done

    def _record(self, outcomes: Iterable[Outcome]) -> None:
        with self._lock:
            self.outcomes.extend(outcomes)


def errors_by_type(outcomes: Iterable[Outcome]) -> Counter[str]:
    return Counter(o.error for o in outcomes if o.error is not None)


def cross_loop_errors(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if CROSS_LOOP in o.detail]


def recovery_seconds(
    outcomes: list[Outcome], since: float, until: float = float("inf")
) -> float | None:
    """Seconds from ``since`` to the last failure among attempts made between ``since``
    and ``until`` (started and ended); None if none of them succeeded."""
    after = [o for o in outcomes if since <= o.started and o.ended < until]
    if not any(o.error is None for o in after):
        return None
    failures = [o.ended for o in after if o.error is not None]
    return (max(failures) - since) if failures else 0.0
