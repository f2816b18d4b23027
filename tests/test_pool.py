"""The pool's decisions, without an event loop: the clock, the jobs and the callers are fakes.

Each behaviour here also has a test with the real actor and the real server
(test_pool_features, test_broker, test_faults).
"""

from __future__ import annotations

from typing import Any

import neo4j.exceptions
import pytest

from broker import BorrowTimeout, BrokerClosed, TooManyWaiters
from broker.messages import Borrow, Checked, CheckNow, Created, WaitReady
from broker.pool import Pool
from broker.pooled import PooledDriver
from tests.fakes import fake_config


class Waiter:
    """Stands for the caller's future."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.state = "pending"

    def done(self) -> bool:
        return self.state != "pending"

    def cancel(self) -> None:
        self.state = "cancelled"


class Jobs:
    """The pool's effects, recorded; jobs run only when a test finishes them."""

    def __init__(self) -> None:
        self.creations: list[tuple[int, float]] = []  # (generation, started)
        self.verified: list[bool] = []  # whether each creation verifies its driver
        self.checks: list[tuple[PooledDriver, bool, bool]] = []
        self.closes: list[PooledDriver] = []
        self.events: list[str] = []
        self.reconnect_failed_calls: list[dict[str, Any]] = []
        self.pool: Pool | None = None
        self.peak = 0

    def start_create(self, context: Any, generation: int, started: float, verify: bool) -> None:
        assert self.pool is not None
        # Asked while the new creation is already counted: the bound holds with it.
        assert self.pool.total() <= self.pool.max_size, "a creation beyond max_size"
        self.peak = max(self.peak, self.pool.total())
        self.creations.append((generation, started))
        self.verified.append(verify)

    def start_check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        self.checks.append((pooled, hook, verify))

    def start_close(self, pooled: PooledDriver) -> None:
        self.closes.append(pooled)

    def resolve(self, request: Any, value: Any) -> None:
        assert not request.waiter.done(), "answered twice"
        request.waiter.state, request.waiter.value = "done", value

    def refuse(self, request: Any, error: BaseException) -> None:
        if not request.waiter.done():
            request.waiter.state, request.waiter.error = "failed", error

    def forget(self, request: Any) -> None:
        pass

    def reconnect_failed(self, stats: dict[str, Any]) -> None:
        self.reconnect_failed_calls.append(stats)

    def emit(self, level: int, event: str, context: Any = None, **fields: Any) -> None:
        self.events.append(event)


def make_pool(**changes: Any) -> tuple[Pool, Jobs]:
    jobs = Jobs()
    pool = Pool(fake_config(**changes), jobs, "test/loop-1", "test")
    jobs.pool = pool
    return pool, jobs


def borrow(pool: Pool, now: float, timeout: float = 5.0) -> Borrow:
    request = Borrow(Waiter(), timeout, None, None)  # type: ignore[arg-type]
    pool.borrow(request, now)
    return request


def finish_creations(
    pool: Pool, jobs: Jobs, now: float, error: BaseException | None = None, count: int = 0
) -> list[PooledDriver]:
    """End the oldest ``count`` creations (all by default), with drivers or ``error``."""
    made = []
    todo = jobs.creations[: count or len(jobs.creations)]
    del jobs.creations[: len(todo)]
    for generation, started in todo:
        if error is not None:
            pool.creation_ended(Created(None, error, None, started), now)
        else:
            pooled = PooledDriver(object(), now, generation)  # type: ignore[arg-type]
            pool.creation_ended(Created(pooled, None, None, started, 0.25), now)
            made.append(pooled)
    return made


def finish_closes(pool: Pool, jobs: Jobs) -> list[PooledDriver]:
    closed = list(jobs.closes)
    jobs.closes.clear()
    for pooled in closed:
        pool.close_ended(pooled)
    return closed


def held(request: Borrow) -> PooledDriver:
    waiter: Any = request.waiter
    assert waiter.state == "done", waiter.error
    value: PooledDriver = waiter.value
    return value


def failed(request: Any) -> BaseException:
    assert request.waiter.state == "failed", request.waiter.state
    error: BaseException = request.waiter.error
    return error


# -- who is served, what grows -----------------------------------------------------------


def test_first_come_first_served_and_growth_up_to_the_maximum() -> None:
    pool, jobs = make_pool(pool_max_size=2)
    requests = [borrow(pool, 0.0) for _ in range(5)]
    assert len(jobs.creations) == 2, "grows for waiters, never beyond max_size"
    finish_creations(pool, jobs, 0.1)
    first, second = held(requests[0]), held(requests[1])
    assert all(not r.waiter.done() for r in requests[2:])
    pool.returned(second, False, 0.2)
    assert held(requests[2]) is second
    pool.returned(first, False, 0.3)
    assert held(requests[3]) is first
    snapshot = pool.snapshot(0.3)
    assert snapshot["waiting"] == snapshot["requests_waiting"] == 1
    assert snapshot["requests_queued"] == 5
    assert jobs.peak == 2


def test_max_waiting_refuses_at_once_and_changes_nothing() -> None:
    pool, jobs = make_pool(pool_max_size=1, max_waiting=2)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(holder)
    waiting = [borrow(pool, 0.1), borrow(pool, 0.1)]
    before = pool.snapshot(0.2)
    extra = borrow(pool, 0.2)
    error = failed(extra)
    assert isinstance(error, TooManyWaiters) and "max_waiting=2" in str(error)
    after = pool.snapshot(0.2)
    assert after["rejected"] == 1
    assert {k: v for k, v in after.items() if k != "rejected"} == {
        k: v for k, v in before.items() if k != "rejected"
    }
    assert jobs.creations == []
    assert all(not r.waiter.done() for r in waiting)


# -- resize ------------------------------------------------------------------------------


def test_resize_down_closes_idle_first_and_the_excess_in_use_on_return() -> None:
    pool, jobs = make_pool(pool_max_size=4)
    requests = [borrow(pool, 0.0) for _ in range(4)]
    finish_creations(pool, jobs, 0.0)
    drivers = [held(r) for r in requests]
    pool.returned(drivers[0], False, 0.1)
    pool.returned(drivers[1], False, 0.1)
    pool.resize(0, 1, version=1, now=0.2)
    assert set(jobs.closes) == {drivers[0], drivers[1]}, "idle ones close at once"
    assert pool.total() == 2 and pool.max_size == 1
    late = borrow(pool, 0.3)
    assert jobs.creations == [], "no new driver while the pool is over its bound"
    pool.returned(drivers[2], False, 0.4)
    assert drivers[2] in jobs.closes, "the excess closes when it comes back"
    assert not late.waiter.done()
    pool.returned(drivers[3], False, 0.5)
    assert held(late) is drivers[3], "within the bound again: served"
    assert pool.total() == 1
    assert pool.snapshot(0.5)["max_size"] == 1


def test_resize_up_grows_for_waiters_and_to_the_new_minimum() -> None:
    pool, jobs = make_pool(pool_max_size=1)
    first = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(first)
    waiting = [borrow(pool, 0.1) for _ in range(3)]
    assert jobs.creations == []
    pool.resize(3, 3, version=1, now=0.2)
    assert len(jobs.creations) == 2
    finish_creations(pool, jobs, 0.3)
    assert [r.waiter.done() for r in waiting] == [True, True, False]
    pool.resize(0, 1, version=1, now=0.4)  # same version again: ignored
    assert pool.max_size == 3
    pool.resize(0, 2, version=3, now=0.4)
    pool.resize(0, 5, version=2, now=0.4)  # arrived late: older than the one applied
    assert pool.max_size == 2


# -- drain, max_borrows, max_lifetime ------------------------------------------------------


def test_drain_replaces_in_use_on_return_and_creations_in_flight() -> None:
    pool, jobs = make_pool(pool_max_size=3)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    busy = held(holder)
    waiting = borrow(pool, 0.1)  # its creation is in flight during the drain
    assert [generation for generation, _ in jobs.creations] == [0]
    pool.drain(1, now=0.2)
    assert jobs.closes == [], "nothing idle: nothing closes now"
    finish_creations(pool, jobs, 0.3)  # made with the settings from before the drain
    (early,) = jobs.closes
    assert early.generation == 0 and pool.closing[early][0] == "drained"
    assert not waiting.waiter.done()
    assert [generation for generation, _ in jobs.creations] == [1], "made again for the waiter"
    pool.returned(busy, False, 0.4)
    assert busy in jobs.closes and pool.closing[busy][0] == "drained"
    finish_creations(pool, jobs, 0.5)
    assert held(waiting).generation == 1


def test_drain_of_an_idle_pool_replaces_each_idle_driver() -> None:
    pool, jobs = make_pool(pool_max_size=3)
    requests = [borrow(pool, 0.0) for _ in range(3)]
    finish_creations(pool, jobs, 0.0)
    old = [held(r) for r in requests]
    for pooled in old:
        pool.returned(pooled, False, 0.1)
    pool.drain(1, now=0.2)
    assert sorted(jobs.closes, key=id) == sorted(old, key=id)
    assert [g for g, _ in jobs.creations] == [1, 1, 1]
    pool.drain(1, now=0.3)  # the same generation again: nothing
    assert len(jobs.creations) == 3


def test_max_borrows_replaces_a_driver_on_its_last_return() -> None:
    pool, jobs = make_pool(pool_max_size=1, max_borrows=2)
    first = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    pooled = held(first)
    pool.returned(pooled, False, 0.1)
    assert held(borrow(pool, 0.2)) is pooled
    pool.returned(pooled, False, 0.3)
    assert jobs.closes == [pooled] and pool.closing[pooled][0] == "max_borrows"
    assert pooled.borrows == 2


# -- hooks and checks ------------------------------------------------------------------------


def test_on_return_runs_on_each_return_and_a_failure_means_a_check() -> None:
    async def reset(driver: Any) -> None:
        return None

    pool, jobs = make_pool(pool_max_size=1, on_return=reset)
    first = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    pooled = held(first)
    pool.returned(pooled, False, 0.1)
    assert jobs.checks == [(pooled, True, False)], "the hook runs; no verification asked"
    waiting = borrow(pool, 0.2)
    assert not waiting.waiter.done(), "not handed out while the hook runs"
    # The hook failed; the verification that followed passed: kept.
    pool.check_ended(Checked(pooled, None, RuntimeError("hook")), 0.3)
    assert held(waiting) is pooled and pool.counters.hook_errors == 1
    pool.returned(pooled, True, 0.4)  # a broken return: hook, then verify
    assert jobs.checks[-1] == (pooled, True, True)
    pool.check_ended(Checked(pooled, neo4j.exceptions.ServiceUnavailable("gone")), 0.5)
    assert pooled in jobs.closes and pool.closing[pooled] == ("failed health check", True)
    stats = pool.snapshot(0.5)
    assert stats["returns_bad"] == 1 and stats["drivers_lost"] == 1


def test_failing_on_create_discards_the_driver_and_counts_the_error() -> None:
    pool, jobs = make_pool(pool_max_size=1)
    request = borrow(pool, 0.0)
    (_, started) = jobs.creations.pop()
    error = RuntimeError("setup failed")
    pool.creation_ended(Created(None, error, None, started, 0.2, True), 0.3)
    assert failed(request) is error
    stats = pool.snapshot(0.3)
    assert stats["hook_errors"] == 1 and stats["errors"] == 1 and stats["connect_errors"] == 0
    assert stats["created"] == 0 and stats["total"] == 0


def test_check_all_verifies_every_idle_driver_and_counts_the_discarded() -> None:
    pool, jobs = make_pool(pool_max_size=3)
    requests = [borrow(pool, 0.0) for _ in range(3)]
    finish_creations(pool, jobs, 0.0)
    drivers = [held(r) for r in requests]
    for pooled in drivers[:2]:
        pool.returned(pooled, False, 0.1)
    check = CheckNow(Waiter())  # type: ignore[arg-type]
    pool.check_all(check, 0.2)
    assert {p for p, _, verify in jobs.checks if verify} == set(drivers[:2])
    pool.check_ended(Checked(drivers[0]), 0.3)
    assert not check.waiter.done()
    pool.check_ended(Checked(drivers[1], neo4j.exceptions.ServiceUnavailable("x")), 0.3)
    assert check.waiter.state == "done" and check.waiter.value == 1  # type: ignore[attr-defined]
    assert pool.snapshot(0.3)["drivers_lost"] == 1
    assert list(pool.idle) == [drivers[0]], "the good one is back"
    nothing, _ = make_pool()
    empty = CheckNow(Waiter())  # type: ignore[arg-type]
    nothing.check_all(empty, 0.4)
    assert empty.waiter.state == "done" and empty.waiter.value == 0  # type: ignore[attr-defined]


# -- failing creations ---------------------------------------------------------------------


def test_creation_error_with_nothing_to_serve_fails_every_uncovered_waiter() -> None:
    pool, jobs = make_pool(pool_max_size=2)
    requests = [borrow(pool, 0.0) for _ in range(5)]
    assert len(jobs.creations) == 2
    auth = neo4j.exceptions.AuthError("bad credentials")
    finish_creations(pool, jobs, 0.1, error=auth, count=1)
    # One creation still runs: it covers one waiter; the four others fail now.
    outcomes = [r.waiter.done() for r in requests]
    assert outcomes.count(True) == 4 and all(failed(r) is auth for r in requests if r.waiter.done())
    assert jobs.creations and len(jobs.creations) == 1, "no new attempt for the failed ones"


def test_creation_error_with_drivers_in_use_fails_only_the_oldest_waiter() -> None:
    pool, jobs = make_pool(pool_max_size=2)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(holder)
    requests = [borrow(pool, 0.1) for _ in range(3)]
    finish_creations(pool, jobs, 0.2, error=neo4j.exceptions.ServiceUnavailable("blip"))
    assert [r.waiter.done() for r in requests] == [True, False, False]
    assert len(jobs.creations) == 1, "the next waiter gets an attempt of its own"


def test_timeout_names_where_drivers_connect_for_how_long_and_the_last_error() -> None:
    pool, jobs = make_pool(pool_max_size=2)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(holder)
    first = borrow(pool, 1.0, timeout=2.0)
    finish_creations(pool, jobs, 1.5, error=neo4j.exceptions.ServiceUnavailable("refused"))
    failed(first)
    second = borrow(pool, 2.0, timeout=2.5)
    pool.withdraw(second, now=4.5)
    error = failed(second)
    assert isinstance(error, BorrowTimeout)
    text = str(error)
    assert "1 driver connecting to bolt://fake.invalid:7687 for 2.5 s" in text
    assert "last creation error: ServiceUnavailable: refused" in text
    assert isinstance(error.__cause__, neo4j.exceptions.ServiceUnavailable)
    assert pool.snapshot(4.5)["timeouts"] == 1


def test_reconnect_failed_after_reconnect_timeout_below_the_minimum() -> None:
    pool, jobs = make_pool(pool_min_size=1, pool_max_size=2, reconnect_timeout=10.0)
    pool.tick(0.0)
    assert len(jobs.creations) == 1
    down = neo4j.exceptions.ServiceUnavailable("down")
    finish_creations(pool, jobs, 0.5, error=down)
    pool.tick(1.0)
    assert jobs.creations == [], "backing off"
    now = 1.5
    while now < 12.0:
        pool.tick(now)
        finish_creations(pool, jobs, now, error=down)
        now += 0.5
    assert len(jobs.reconnect_failed_calls) == 1
    stats = jobs.reconnect_failed_calls[0]
    assert stats["last_error"] == "ServiceUnavailable: down" and stats["min_size"] == 1
    attempts = pool.counters.connect_errors
    assert 3 <= attempts <= 6, f"retried with backoff, not at every tick: {attempts}"
    pool.tick(now + 30.0)  # past the longest backoff: one more attempt
    assert len(jobs.creations) == 1
    assert len(jobs.reconnect_failed_calls) == 2, "called again after another period"
    finish_creations(pool, jobs, now + 30.5)  # the server is back
    assert pool.failing_since is None and pool.last_error is None
    pool.tick(now + 45.0)
    assert len(jobs.reconnect_failed_calls) == 2


# -- readiness -------------------------------------------------------------------------------


def test_wait_ready_starts_the_minimum_and_answers_when_it_is_there() -> None:
    pool, jobs = make_pool(pool_min_size=2, pool_max_size=3)
    ready = WaitReady(Waiter(), 5.0)  # type: ignore[arg-type]
    pool.wait_ready(ready, 0.0)
    assert len(jobs.creations) == 2, "started now, not at the next tick"
    finish_creations(pool, jobs, 0.1, count=1)
    assert not ready.waiter.done()
    finish_creations(pool, jobs, 0.2)
    assert ready.waiter.state == "done"
    again = WaitReady(Waiter(), 5.0)  # type: ignore[arg-type]
    pool.wait_ready(again, 0.3)
    assert again.waiter.done() and jobs.creations == []


def test_wait_ready_gets_the_creation_error_or_a_timeout_naming_the_cause() -> None:
    pool, jobs = make_pool(pool_min_size=1, pool_max_size=1)
    ready = WaitReady(Waiter(), 5.0)  # type: ignore[arg-type]
    pool.wait_ready(ready, 0.0)
    auth = neo4j.exceptions.AuthError("no")
    finish_creations(pool, jobs, 0.1, error=auth)
    assert failed(ready) is auth
    slow = WaitReady(Waiter(), 1.0)  # type: ignore[arg-type]
    pool.wait_ready(slow, 1.0)
    pool.withdraw(slow, now=2.0)
    error = failed(slow)
    assert isinstance(error, BorrowTimeout) and error.ready
    assert "pool not ready within 1 s: 0 of 1 drivers ready" in str(error)
    assert "connecting to bolt://fake.invalid:7687 for 1.0 s" in str(error)
    assert pool.counters.timeouts == 0, "a readiness wait is not a borrow"


# -- stats -----------------------------------------------------------------------------------


def test_timing_counters_and_pop_stats() -> None:
    pool, jobs = make_pool(pool_max_size=1)
    first = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.5)  # first waited 0.5 s
    pooled = held(first)
    second = borrow(pool, 1.0)
    pool.returned(pooled, True, 2.0)  # held 1.5 s, broken: checked
    pool.check_ended(Checked(pooled), 2.25)  # second waited 1.25 s
    held(second)
    pool.returned(pooled, False, 2.5)  # held 0.25 s
    stats = pool.snapshot(3.0)
    assert stats["requests_queued"] == 2 and stats["borrows"] == 2
    assert stats["wait_ms"] == 1750 and stats["wait_max_ms"] == 1250
    assert stats["usage_ms"] == 1750 and stats["connect_ms"] == 250
    assert stats["returns_bad"] == 1
    popped = pool.pop_stats(3.0)
    assert popped["wait_ms"] == 1750 and popped["borrows"] == 2
    third = borrow(pool, 4.0)
    pool.returned(held(third), False, 4.1)
    popped = pool.pop_stats(5.0)
    assert popped["borrows"] == 1 and popped["wait_ms"] == 0 and popped["wait_max_ms"] == 0
    assert popped["usage_ms"] == 100 and popped["requests_queued"] == 0
    assert pool.snapshot(5.0)["borrows"] == 3, "the cumulative counters never go back"
    assert pool.wait_histogram.count == 3 and pool.hold_histogram.count == 3
    assert pool.hold_histogram.sum == pytest.approx(1.85)


def test_stop_refuses_every_caller() -> None:
    pool, jobs = make_pool(pool_min_size=1, pool_max_size=1)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(holder)
    waiting = borrow(pool, 0.1)
    ready = WaitReady(Waiter(), 5.0)  # type: ignore[arg-type]
    pool.wait_ready(ready, 0.1)
    assert ready.waiter.done(), "one driver in use: ready"
    pool.stop("test", 10.0)
    assert isinstance(failed(waiting), BrokerClosed)
    late = borrow(pool, 0.2)
    assert isinstance(failed(late), BrokerClosed)


def test_a_closing_pool_neither_grows_nor_replaces() -> None:
    pool, jobs = make_pool(pool_max_size=2)
    holder = borrow(pool, 0.0)
    finish_creations(pool, jobs, 0.0)
    held(holder)
    pool.stop("test", 10.0)
    pool.resize(2, 3, version=1, now=0.1)
    pool.drain(1, now=0.1)
    assert jobs.creations == [] and pool.max_size == 3 and pool.generation == 1


def test_drivers_made_for_borrowers_skip_the_check_only_when_told() -> None:
    pool, jobs = make_pool(pool_min_size=0, pool_max_size=4, verify_on_create=False)
    borrow(pool, 0.0)
    assert jobs.verified == [False], "the borrower's own first query proves it"
    pool, jobs = make_pool(pool_min_size=0, pool_max_size=4)
    borrow(pool, 0.0)
    assert jobs.verified == [True], "verified by default"


def test_drivers_made_for_the_minimum_or_a_readiness_wait_are_always_verified() -> None:
    pool, jobs = make_pool(pool_min_size=2, pool_max_size=4, verify_on_create=False)
    pool.wait_ready(WaitReady(Waiter(), None), 0.0)  # type: ignore[arg-type]
    assert jobs.verified == [True, True], "nobody's query would prove these"
    finish_creations(pool, jobs, 0.1)
    first = borrow(pool, 0.2)
    borrow(pool, 0.2)
    borrow(pool, 0.2)  # the third grows the pool, for a borrower
    assert jobs.verified == [True, True, False]
    held(first)
    pool, jobs = make_pool(pool_min_size=2, pool_max_size=4, verify_on_create=False)
    pool.tick(0.0)  # maintenance makes the minimum
    assert jobs.verified == [True, True]


def test_an_error_is_described_with_its_root_cause() -> None:
    from broker.errors import describe

    try:
        try:
            try:
                raise OSError("certificate verify failed: unable to get local issuer")
            except OSError as exc:
                raise ConnectionError("handshake") from exc
        except ConnectionError:
            raise neo4j.exceptions.ServiceUnavailable("Unable to retrieve routing information")  # noqa: B904
    except neo4j.exceptions.ServiceUnavailable as exc:
        shown = describe(exc)
    assert shown == (
        "ServiceUnavailable: Unable to retrieve routing information"
        " (caused by OSError: certificate verify failed: unable to get local issuer)"
    )
    assert describe(ValueError("alone")) == "ValueError: alone"
    assert describe(None) == "none"
    looped = RuntimeError("a")
    looped.__cause__ = RuntimeError("b")
    looped.__cause__.__cause__ = looped  # a cycle ends the walk
    assert describe(looped) == "RuntimeError: a (caused by RuntimeError: b)"
