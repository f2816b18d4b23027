"""Random sequences of borrow, return, cancel, timeout, failing create, failing hooks,
resize, drain and close against one actor; the pool's invariants are checked after
every step, and the bound at every moment a driver is added.

Fake drivers make creation failures and delays happen on demand; the same
behaviours have real-server tests in test_broker, test_faults, test_reliability
and test_pool_features.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import neo4j.exceptions
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker import BorrowTimeout, Broker, BrokerClosed, Connection, TooManyWaiters
from broker.actor import Actor
from tests.fakes import DriverPlan, fake_config

MAX = 2

borrow = st.tuples(st.just("borrow"), st.sampled_from([None, 0.0, 0.02, 0.1]))
sizes = st.integers(1, 3).flatmap(lambda top: st.tuples(st.integers(0, top), st.just(top)))
ops = st.lists(
    st.one_of(
        # Borrows weigh three times as much, so pools fill up and queues form.
        borrow,
        borrow,
        borrow,
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("release_broken"), st.integers(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("handoff_then_cancel"), st.integers(0, 20)),
        st.tuples(st.just("fail_next_create"), st.none()),
        st.tuples(st.just("slow_next_create"), st.sampled_from([0.01, 0.05])),
        st.tuples(st.just("fail_next_on_create"), st.none()),
        st.tuples(st.just("fail_next_on_return"), st.none()),
        st.tuples(st.just("resize"), sizes),
        st.tuples(st.just("drain"), st.none()),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.01, 0.05])),
        st.tuples(st.just("close"), st.none()),
    ),
    min_size=5,
    max_size=50,
)
#: Pool settings drawn per sequence: (max_waiting, max_borrows, hooks on).
knobs = st.tuples(st.sampled_from([0, 3]), st.sampled_from([None, 2]), st.booleans())


class HookFailure(Exception):
    """What a failing on_create or on_return hook raises."""


class Hooks:
    """on_create and on_return hooks that fail when told to."""

    def __init__(self) -> None:
        self.fail_create = 0
        self.fail_return = 0

    async def on_create(self, driver: Any) -> None:
        await asyncio.sleep(0)
        if self.fail_create:
            self.fail_create -= 1
            raise HookFailure("on_create")

    async def on_return(self, driver: Any) -> None:
        await asyncio.sleep(0)
        if self.fail_return:
            self.fail_return -= 1
            raise HookFailure("on_return")


@dataclass
class Borrower:
    task: asyncio.Task[None]
    release: asyncio.Event = field(default_factory=asyncio.Event)
    broken: bool = False
    conn: Connection | None = None
    outcome: str = "pending"


async def borrower(b: Broker, timeout: float | None, me: Borrower) -> None:
    try:
        me.conn = await b.borrow(timeout=timeout if timeout is not None else 5.0)
    except BorrowTimeout:
        me.outcome = "timed out"
        return
    except TooManyWaiters:
        me.outcome = "rejected"
        return
    except BrokerClosed:
        me.outcome = "refused"
        return
    except (neo4j.exceptions.ServiceUnavailable, HookFailure):
        me.outcome = "create failed"
        return
    except asyncio.CancelledError:
        me.outcome = "cancelled"
        raise
    me.outcome = "served"
    try:
        await me.release.wait()
    finally:
        if me.broken:
            me.conn.mark_broken()
        await me.conn.release()


class WatchedBroker(Broker):
    """Checks the bound at the very moment each creation starts, in every actor it makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound_broken: list[str] = []

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        actor = super()._new_actor(loop)
        start_create = actor.start_create

        def checked(*args: Any) -> None:
            pool = actor.pool
            # The new creation is already counted here.
            if pool.total() > pool.max_size:
                self.bound_broken.append(
                    f"creation started at total={pool.total()} > max={pool.max_size}"
                )
            start_create(*args)

        actor.start_create = checked  # type: ignore[method-assign]
        return actor


def check_invariants(
    actor: Actor, borrowers: list[Borrower], acquired: int, ceiling: int, max_borrows: int | None
) -> None:
    pool = actor.pool
    idle, in_use = list(pool.idle), set(pool.in_use)
    checking, closing = set(pool.checking), set(pool.closing)
    assert pool.total() <= max(pool.max_size, ceiling), (
        "more drivers than the current max, or more than before a shrink"
    )
    assert len(idle) == len(set(idle)), "a driver twice in the idle list"
    places = [set(idle), in_use, checking, closing]
    for i, a in enumerate(places):
        for b in places[i + 1 :]:
            assert not (a & b), "a driver in two places at once"
    holders = [m.conn.pooled for m in borrowers if m.conn is not None and m.conn.pooled is not None]
    assert len(holders) == len(set(holders)), "one driver held by two borrowers"
    assert set(holders) <= in_use | closing, "a held driver the actor does not count as in use"
    assert in_use <= set(holders), "a driver counted in use that nobody holds (leaked)"
    alive = len(idle) + len(in_use) + len(checking) + len(closing)
    assert pool.counters.created - pool.counters.closed == alive, (
        "created - closed == drivers alive"
    )
    assert pool.counters.borrows >= acquired
    if pool.config.max_waiting:
        assert len(pool.waiters) <= pool.config.max_waiting, "more waiters than max_waiting"
    if max_borrows is not None:
        live = set(idle) | in_use | checking
        assert all(p.borrows <= max_borrows for p in live), "handed out beyond max_borrows"
        assert all(p.borrows < max_borrows for p in idle), "a used-up driver kept idle"
    assert all(p.generation == pool.generation for p in idle), "a drained driver kept idle"


def signature(b: Broker, borrowers: list[Borrower]) -> tuple[Any, ...]:
    pools = [a.pool for a in b.actors()]
    handles = [
        (m.outcome, m.conn is not None and m.conn.released, m.task.done()) for m in borrowers
    ]
    counts = [
        (
            p.counters.borrows,
            p.counters.created,
            p.counters.closed,
            len(p.idle),
            len(p.in_use),
            len(p.waiters),
        )
        for p in pools
    ]
    jobs = [(len(p.connecting), len(p.checking), len(p.closing)) for p in pools]
    return (*handles, *counts, *jobs)


async def settle(b: Broker, borrowers: list[Borrower]) -> None:
    """Until nothing moves: every message posted so far has been handled.

    One stats request is a barrier for what was posted before it, but the
    actor may hand out a driver after answering it (a job reported in the
    same batch), and borrowers woken then may post returns: hence the rounds,
    until neither the borrowers nor the pool changed.
    """
    seen: tuple[Any, ...] | None = None
    for _ in range(100):
        await asyncio.sleep(0)
        await b.stats()
        now = signature(b, borrowers)
        if now == seen:
            return
        seen = now


async def scenario(
    steps: list[tuple[str, Any]],
    max_waiting: int = 0,
    max_borrows: int | None = None,
    hooks_on: bool = False,
) -> None:
    plan = DriverPlan()
    hooks = Hooks()
    config = fake_config(
        pool_max_size=MAX,
        health_check_interval=None,
        max_waiting=max_waiting,
        max_borrows=max_borrows,
        on_create=hooks.on_create if hooks_on else None,
        on_return=hooks.on_return if hooks_on else None,
    )
    b = WatchedBroker(config, driver_factory=plan)
    borrowers: list[Borrower] = []
    closing: list[asyncio.Task[None]] = []
    ceiling = 0  # after a shrink, the drivers there were may remain (and only go down)

    def pick(index: int) -> Borrower | None:
        return borrowers[index % len(borrowers)] if borrowers else None

    for op, arg in steps:
        if op == "borrow":
            me = Borrower(task=None)  # type: ignore[arg-type]
            me.task = asyncio.create_task(borrower(b, arg, me))
            borrowers.append(me)
        elif op in ("release", "release_broken"):
            me = pick(arg)
            if me is not None:
                me.broken = op == "release_broken"
                me.release.set()
        elif op == "cancel":
            me = pick(arg)
            if me is not None:
                me.task.cancel()
        elif op == "handoff_then_cancel":
            # Return a driver, and cancel the oldest waiter right behind the
            # actor's wake-up: the actor hands it over, then the waiter learns
            # it is cancelled.
            holders = [m for m in borrowers if m.conn is not None and not m.conn.released]
            waiting = [m for m in borrowers if m.outcome == "pending" and not m.task.done()]
            if holders and waiting:
                holder = holders[arg % len(holders)]
                assert holder.conn is not None
                holder.conn.release_sync()
                asyncio.get_running_loop().call_soon(waiting[0].task.cancel)
        elif op == "fail_next_create":
            plan.fail_next()
        elif op == "slow_next_create":
            plan.slow_next(arg)
        elif op == "fail_next_on_create":
            hooks.fail_create += 1
        elif op == "fail_next_on_return":
            hooks.fail_return += 1
        elif op == "resize":
            b.resize(*arg)
        elif op == "drain":
            b.drain()
        elif op == "wait":
            await asyncio.sleep(arg)
        elif op == "close" and not closing:
            closing.append(asyncio.create_task(b.aclose(timeout=0.2)))
        actors = b.actors()
        await asyncio.sleep(0)
        if actors:
            await settle(b, borrowers)
            acquired = sum(1 for m in borrowers if m.outcome == "served")
            check_invariants(actors[0], borrowers, acquired, ceiling, max_borrows)
            pool = actors[0].pool
            ceiling = pool.total()
        assert b.bound_broken == [], b.bound_broken

    for me in borrowers:
        me.release.set()
    await b.aclose(timeout=1.0)
    await asyncio.gather(*closing)
    await asyncio.wait_for(asyncio.gather(*(m.task for m in borrowers), return_exceptions=True), 5)
    # Every waiter was served, timed out, rejected, refused, failed, or cancelled.
    outcomes = {m.outcome for m in borrowers}
    expected = {"served", "timed out", "rejected", "refused", "create failed", "cancelled"}
    assert outcomes <= expected, outcomes
    assert plan.open_drivers == 0, "every driver closed in the end"
    totals = b.totals()
    assert totals["created"] == totals["closed"]
    assert b.bound_broken == [], b.bound_broken


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops, knobs)
# Sequences worth running every time, besides the random ones.
@example(
    [("borrow", None)] * 4 + [("wait", 0.01), ("handoff_then_cancel", 0), ("wait", 0.01)],
    (0, None, False),
)
@example(
    [("borrow", None)] * 5 + [("wait", 0.01), ("close", None), ("release", 0), ("wait", 0.3)],
    (0, None, False),
)
@example(
    [("fail_next_create", None), ("slow_next_create", 0.05)]
    + [("borrow", 0.02)] * 3
    + [("cancel", 1), ("wait", 0.05), ("borrow", None), ("wait", 0.05)],
    (0, None, False),
)
# A borrower served and released inside one barrier: its return is still in the mailbox.
@example(
    [
        ("slow_next_create", 0.01),
        ("borrow", None),
        ("release", 0),
        ("borrow", None),
        ("release", 1),
    ],
    (0, None, False),
)
# Shrink while everything is in use, then drain, then grow again.
@example(
    [("borrow", None)] * 3
    + [("wait", 0.01), ("resize", (0, 1)), ("drain", None), ("borrow", None), ("release", 0)]
    + [("release", 1), ("wait", 0.01), ("resize", (1, 3)), ("borrow", None), ("wait", 0.01)],
    (3, 2, True),
)
def test_random_sequences_keep_the_invariants(
    steps: list[tuple[str, Any]], knobs: tuple[int, int | None, bool]
) -> None:
    asyncio.run(asyncio.wait_for(scenario(steps, *knobs), 30))
