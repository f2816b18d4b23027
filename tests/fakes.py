"""A fake driver for unit tests of the actor's state machine.

Integration tests cover the same behaviour against the real server; these
fakes only make the rare paths (slow or failing creation, failing checks)
happen on demand.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import neo4j.exceptions

from broker import Neo4jConnectionConfig


class FakeDriver:
    ids = itertools.count(1)

    def __init__(self, plan: DriverPlan) -> None:
        self.id = next(self.ids)
        self.plan = plan
        self.closed = False
        self.verifications = 0

    async def verify_connectivity(self) -> None:
        self.verifications += 1
        if self.verifications == 1:
            delay, error = self.plan.next_creation()
        else:
            delay, error = self.plan.check_delay, self.plan.check_error
        if delay:
            await asyncio.sleep(delay)
        if self.closed:
            raise neo4j.exceptions.ServiceUnavailable("closed")
        if error is not None:
            raise error

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


class DriverPlan:
    """What the next creations and checks do; also the factory itself."""

    def __init__(self) -> None:
        self.creations: deque[tuple[float, BaseException | None]] = deque()
        self.check_delay = 0.0
        self.check_error: BaseException | None = None
        self.made: list[FakeDriver] = []

    def fail_next(self, error: BaseException | None = None) -> None:
        self.creations.append((0.0, error or neo4j.exceptions.ServiceUnavailable("refused")))

    def slow_next(self, seconds: float) -> None:
        self.creations.append((seconds, None))

    def next_creation(self) -> tuple[float, BaseException | None]:
        return self.creations.popleft() if self.creations else (0.0, None)

    def __call__(self, config: Neo4jConnectionConfig) -> Any:
        driver = FakeDriver(self)
        self.made.append(driver)
        return driver

    @property
    def open_drivers(self) -> int:
        return sum(1 for d in self.made if not d.closed)


def fake_config(**changes: Any) -> Neo4jConnectionConfig:
    base = Neo4jConnectionConfig(
        uri="bolt://fake.invalid:7687", password="unused", pool_max_size=3, pool_min_size=0
    )
    return base.replace(**changes)
