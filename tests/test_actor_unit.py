"""The actor's state machine with fake drivers: paths that are hard to force on a server.

Each behaviour here also has a real-server test (test_broker, test_faults).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
from typing import Any

import neo4j.exceptions
import pytest
import structlog

import broker
from broker import BorrowTimeout, Broker, BrokerClosed
from broker.broker import _set_once
from broker.messages import Borrow, StatsRequest
from tests.fakes import DriverPlan, fake_config
from tests.helpers import eventually


def snapshot(b: Broker) -> dict[str, Any]:
    (actor,) = b.actors()
    return actor.snapshot()


async def test_cancel_during_connect_does_not_leak_the_slot() -> None:
    """httpcore's open bug: a borrower cancelled while its driver connects."""
    plan = DriverPlan()
    plan.slow_next(0.2)
    b = Broker(fake_config(pool_max_size=1), driver_factory=plan)
    task = asyncio.create_task(b.borrow().__aenter__())
    await eventually(lambda: b.actors() and snapshot(b)["creating"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: snapshot(b)["available"] == 1)
    stats = snapshot(b)
    assert stats["total"] == 1 and stats["creating"] == 0 and stats["cancellations"] == 1
    async with b.borrow(timeout=1) as conn:  # the slot was not lost
        assert conn.driver is plan.made[0]
    await b.aclose()
    assert plan.open_drivers == 0


async def test_slow_creation_does_not_block_other_borrowers() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=3), driver_factory=plan)
    first, second = await b.borrow(), await b.borrow()
    plan.slow_next(1.0)
    third = asyncio.create_task(b.borrow().__aenter__())  # its new driver takes 1 s
    await eventually(lambda: snapshot(b)["creating"] == 1)
    # Returns, hand-outs and stats go on while that driver is being made.
    await first.release()
    conn = await asyncio.wait_for(third, 0.3)
    assert conn.driver is plan.made[0]
    await second.release()
    again = await asyncio.wait_for(b.borrow(), 0.3)
    assert again.driver is plan.made[1]
    stats = await asyncio.wait_for(b.stats(), 0.3)
    assert next(iter(stats.values()))["creating"] == 1, "the slow creation is still running"
    for c in (conn, again):
        await c.release()
    await eventually(lambda: snapshot(b)["available"] == 3, timeout=3)
    await b.aclose()


async def test_creation_error_goes_to_the_oldest_waiter_and_frees_the_slot() -> None:
    plan = DriverPlan()
    plan.fail_next(neo4j.exceptions.AuthError("bad credentials"))
    # No backoff after the failed login: the next borrow may log in at once.
    b = Broker(fake_config(pool_max_size=1, auth_retry_first=0), driver_factory=plan)
    with pytest.raises(neo4j.exceptions.AuthError):
        await b.borrow()
    stats = snapshot(b)
    assert stats["total"] == 0 and stats["errors"] == 1 and stats["waiting"] == 0
    async with b.borrow():
        pass
    await b.aclose()


async def test_failed_check_gives_a_fresh_driver_or_the_error() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=1, health_check_interval=0), driver_factory=plan)
    async with b.borrow() as conn:
        first = conn.driver
    plan.check_error = neo4j.exceptions.ServiceUnavailable("gone")
    async with b.borrow() as conn:
        assert conn.driver is not first  # replaced
    assert first.closed  # type: ignore[attr-defined]
    # Now nothing can be made either: the borrower gets the creation error.
    plan.fail_next(neo4j.exceptions.ServiceUnavailable("still gone"))
    with pytest.raises(neo4j.exceptions.ServiceUnavailable, match="still gone"):
        await b.borrow()
    stats = snapshot(b)
    assert stats["discarded"] == 2 and stats["total"] == 0
    await b.aclose()


async def test_broken_return_is_checked_before_reuse() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=1, health_check_interval=None), driver_factory=plan)
    with pytest.raises(neo4j.exceptions.SessionExpired):
        async with b.borrow():
            raise neo4j.exceptions.SessionExpired("connection dropped")
    await eventually(lambda: snapshot(b)["available"] == 1)
    assert plan.made[0].verifications == 2, "checked once more after the error"
    assert snapshot(b)["checking"] == 0
    await b.aclose()


async def test_close_fails_waiters_and_waits_for_drivers_in_use() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=1), driver_factory=plan)
    held = await b.borrow()
    waiter = asyncio.create_task(b.borrow().__aenter__())
    await eventually(lambda: snapshot(b)["waiting"] == 1)
    closing = asyncio.create_task(b.aclose(timeout=5))
    with pytest.raises(BrokerClosed):
        await waiter
    await asyncio.sleep(0.05)
    assert not plan.made[0].closed, "in use: closed only when it comes back"
    await held.release()
    await closing
    assert plan.open_drivers == 0
    with pytest.raises(BrokerClosed):
        await b.borrow()


async def test_close_deadline_closes_drivers_still_in_use() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=1), driver_factory=plan)
    held = await b.borrow()
    await b.aclose(timeout=0.1)
    assert plan.made[0].closed
    await held.release()  # late: harmless
    assert b.totals()["closed"] == 1


async def test_timeout_zero_means_now_or_never() -> None:
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=1), driver_factory=plan)
    held = await b.borrow()
    with pytest.raises(BorrowTimeout):
        await b.borrow(timeout=0)
    await held.release()
    async with b.borrow(timeout=0):  # an idle driver is handed out at once
        pass
    await b.aclose()


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_bad_borrow_timeout(bad: Any) -> None:
    b = Broker(fake_config(), driver_factory=DriverPlan())
    with pytest.raises(ValueError, match="timeout must be zero or more"):
        b.borrow(timeout=bad)
    b.close()


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 5])
def test_loop_ending_while_jobs_are_queued_does_not_hang(yields: int) -> None:
    """asyncio.run cancels every task, even jobs that have not started: all must report."""
    plan = DriverPlan()
    b = Broker(fake_config(pool_max_size=2, health_check_interval=None), driver_factory=plan)

    async def main() -> None:
        held = await b.borrow()
        try:
            async with b.borrow():
                raise neo4j.exceptions.SessionExpired("dropped")  # a check job follows
        except neo4j.exceptions.SessionExpired:
            pass
        for _ in range(yields):
            await asyncio.sleep(0)
        del held  # abandoned: closed when the loop ends

    finished = threading.Event()

    def run() -> None:
        asyncio.run(main())
        finished.set()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert finished.is_set(), "asyncio.run() hung at loop end"
    assert plan.open_drivers == 0
    assert b.totals()["created"] == b.totals()["closed"] == 2


@pytest.mark.hardening
def test_pops_from_two_threads_at_once_report_each_borrow_once() -> None:
    """Two threads popping a parked loop at the same moment: each count once."""
    b = Broker(fake_config(pool_min_size=0), driver_factory=DriverPlan())

    async def fifty() -> None:
        for _ in range(50):
            async with b.borrow():
                pass

    runner = asyncio.Runner()
    try:
        runner.run(fifty())  # the loop is parked from here on
        start = threading.Barrier(2)
        popped: list[int] = []

        def pop() -> None:
            start.wait()
            popped.extend(entry["borrows"] for entry in b.pop_stats().values())

        threads = [threading.Thread(target=pop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(popped) == [0, 50], "each borrow reported by exactly one pop"
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["borrow", "stats"])
async def test_mail_deferred_past_the_actor_end_is_still_answered(kind: str) -> None:
    """A sender that found the mailbox's lock taken hands its message to the
    loop for later (Actor.post_soon); if the actor has stopped by then, the
    sender still gets an answer instead of waiting for ever."""
    b = Broker(fake_config(pool_min_size=0), driver_factory=DriverPlan())
    async with b.borrow():
        pass
    (actor,) = b.actors()
    await b.aclose()
    assert actor.finished
    loop = asyncio.get_running_loop()
    if kind == "borrow":
        waiter: asyncio.Future[Any] = loop.create_future()
        borrow = Borrow(waiter, 30.0, asyncio.current_task(), contextvars.copy_context())
        assert actor.mailbox.post_soon(borrow)
        with pytest.raises(BrokerClosed):
            await asyncio.wait_for(waiter, 2)
    else:
        asked: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        assert actor.mailbox.post_soon(StatsRequest(functools.partial(_set_once, asked)))
        answer = await asyncio.wait_for(asyncio.wrap_future(asked), 2)
        assert answer["state"] == "stopped"


# -- mail handled by a sender in the actor's place ---------------------------------


async def test_mail_posted_while_mail_is_handled_waits_its_turn() -> None:
    """A return posted from inside a message's handling (here a log processor,
    as a callback or an eager task would) is handled after that message, never
    in the middle of it."""
    plan = DriverPlan()
    b = Broker(fake_config(pool_min_size=0, pool_max_size=2), driver_factory=plan)
    held = await b.borrow()
    errors: list[dict[str, Any]] = []

    def release_on_second_driver(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "driver.created" and len(plan.made) == 2:
            held.release_sync()  # the Created report is still being handled
        if event["event"] == "actor.error":
            errors.append(event)
        raise structlog.DropEvent

    structlog.configure(
        processors=[release_on_second_driver],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    second = await asyncio.wait_for(b.borrow(), 5)
    # Handled in order: the new driver goes to the waiting borrower, then the return.
    assert second.driver is plan.made[1]
    await eventually(lambda: snapshot(b)["available"] == 1)
    stats = snapshot(b)
    assert stats["in_use"] == 1 and stats["total"] == 2 and errors == []
    await second.release()
    await b.aclose()


async def test_a_return_during_a_pop_of_the_stats_waits_for_the_actor() -> None:
    """pop_stats() read on the loop's own thread: a return that arrives in the
    middle (a finalizer) is not handled until the read is over."""
    b = Broker(fake_config(pool_min_size=0), driver_factory=DriverPlan())
    held = await b.borrow()
    (actor,) = b.actors()
    pool = actor.pool
    reading = pool.snapshot
    in_use_after_the_return: list[int] = []

    def read_with_a_return_in_between(now: float) -> Any:
        held.release_sync()
        in_use_after_the_return.append(len(pool.in_use))
        return reading(now)

    pool.snapshot = read_with_a_return_in_between  # type: ignore[method-assign]
    try:
        (entry,) = b.pop_stats().values()
    finally:
        del pool.snapshot
    assert in_use_after_the_return == [1], "the return was handled in the middle of the read"
    assert entry["in_use"] == 1 and entry["borrows"] == 1
    await eventually(lambda: snapshot(b)["available"] == 1)
    await b.aclose()


async def test_a_return_from_inside_the_actors_own_step_is_delivered() -> None:
    """A finalizer may run inside the actor's own step, after it has marked
    itself parked and before it really is: the return cannot be handled there
    (the actor's context is in use), so it waits for the actor's next wake-up."""
    plan = DriverPlan()
    b = Broker(fake_config(pool_min_size=0), driver_factory=plan)
    held = await b.borrow()
    (actor,) = b.actors()
    await eventually(lambda: actor.mailbox.parked)  # parked
    actor.context.run(held.release_sync)  # as the actor's own step would run a finalizer
    await eventually(lambda: snapshot(b)["available"] == 1)
    async with b.borrow(timeout=1) as again:
        assert again.driver is plan.made[0]
    await b.aclose()


@pytest.mark.hardening
async def test_a_user_locked_by_the_server_is_said_so_and_not_tried_again() -> None:
    """Neo4j answers AuthenticationRateLimit to every login of a locked user;
    the broker names the lock, the user and the wait, and tries no login
    meanwhile, from any loop. (The real server's lock: tests/test_neo4j_only.py.)"""
    locked = neo4j.exceptions.Neo4jError._hydrate_neo4j(
        code="Neo.ClientError.Security.AuthenticationRateLimit",
        message="The client has provided incorrect authentication details too many times",
    )
    plan = DriverPlan()
    plan.fail_next(locked)
    b = Broker(fake_config(pool_min_size=0, auth_retry_first=30.0), driver_factory=plan)
    with pytest.raises(broker.UserLocked) as first:
        async with b.borrow(timeout=5):
            pass
    text = str(first.value)
    assert "locked user 'neo4j'" in text and "Check the password" in text
    assert first.value.__cause__ is locked
    assert isinstance(first.value, neo4j.exceptions.AuthError)

    def other_loop() -> None:
        async def borrow() -> None:
            async with b.borrow(timeout=5):
                pass

        with pytest.raises(broker.UserLocked):
            asyncio.run(borrow())

    thread = threading.Thread(target=other_loop)
    thread.start()
    thread.join()
    assert len(plan.made) == 1, "no login tried while the user is locked"
    await b.aclose()
