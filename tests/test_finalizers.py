"""Code that the garbage collector runs (finalizers) never blocks and never takes a lock.

The cyclic collector runs finalizers wherever an allocation triggers it,
including inside the mailbox's own critical section on the loop's thread.
A finalizer that waits for that lock then waits forever. These tests hold
the mailbox's lock on the loop's thread and make each finalizer of the
broker run inside that window; a watchdog releases the lock (and fails the
test) instead of letting the test hang.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from broker import Broker, Connection
from broker.actor import Actor
from tests.helpers import eventually

MakeBroker = Callable[..., Broker]
WATCHDOG_SECONDS = 10.0


@contextmanager
def mailbox_lock_held(actor: Actor) -> Iterator[None]:
    """Hold the actor's mailbox lock on this thread, as janus does inside get/put."""
    mutex = actor.mailbox.lock
    mutex.acquire()
    fired = threading.Event()

    def rescue() -> None:
        fired.set()
        mutex.release()  # lets a finalizer blocked on it go on, so the test can fail

    watchdog = threading.Timer(WATCHDOG_SECONDS, rescue)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        watchdog.join()
        if not fired.is_set():
            mutex.release()
    if fired.is_set():
        pytest.fail("a finalizer blocked on the mailbox lock held by its own thread")


def _drop_by_refcount(conn: Connection) -> list[Any]:
    return [conn]


def _drop_in_a_cycle(conn: Connection) -> list[Any]:
    cycle: list[Any] = [conn]
    cycle.append(cycle)  # once the holder lets go, only the cyclic collector can free it
    return [cycle]


async def _pool(b: Broker) -> dict[str, Any]:
    (entry,) = (await b.stats()).values()
    return entry


@pytest.mark.parametrize("drop", [_drop_by_refcount, _drop_in_a_cycle], ids=["refcount", "cycle"])
async def test_a_held_handle_dropped_inside_the_mailbox_lock(
    make_broker: MakeBroker, drop: Callable[[Connection], list[Any]]
) -> None:
    b = make_broker(pool_min_size=0, pool_max_size=1)
    conn = await b.borrow()
    actor = conn._actor
    assert actor is not None
    holder = drop(conn)
    del conn
    gc.disable()
    try:
        with mailbox_lock_held(actor):
            holder.clear()  # the handle's last reference, or the cycle's, goes here
            gc.collect()
    finally:
        gc.enable()
    # The driver came back: the only slot of the pool is free again.
    await eventually(lambda: actor.snapshot()["in_use"] == 0, what="the driver came back")
    async with b.borrow(timeout=5) as again:
        await again.driver.execute_query("RETURN 1")
    assert (await _pool(b))["created"] == 1


async def test_a_borrow_finalized_after_its_hand_over_inside_the_mailbox_lock(
    make_broker: MakeBroker,
) -> None:
    """A borrowing coroutine closed by the collector after the actor handed it a driver.

    That is what happens to a borrower whose loop was closed under it: the
    coroutine's ``finally`` code runs from the collector, anywhere.
    """
    b = make_broker(pool_min_size=0, pool_max_size=1)
    borrowing = b.borrow()._acquire()
    waiter = borrowing.send(None)  # runs up to its wait for the actor's answer
    assert isinstance(waiter, asyncio.Future)
    await eventually(waiter.done, what="the actor handed over a driver")
    actor = b.actor_of(asyncio.get_running_loop())
    assert actor is not None and actor.snapshot()["in_use"] == 1
    with mailbox_lock_held(actor):
        del borrowing  # its finalizer closes it: GeneratorExit at the wait
    await eventually(lambda: actor.snapshot()["in_use"] == 0, what="the driver came back")
    async with b.borrow(timeout=5) as again:
        await again.driver.execute_query("RETURN 1")


def test_a_handle_dropped_after_its_loop_closed_does_nothing(bolt_config: Any) -> None:
    """No error, no warning, nothing written anywhere: the loop is gone."""
    b = Broker(bolt_config.replace(pool_min_size=0))
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(b.borrow())
    actor = conn._actor
    assert actor is not None
    loop.run_until_complete(b.aclose(timeout=0.1))  # the handle is still held
    loop.close()
    holder = _drop_in_a_cycle(conn)
    del conn
    holder.clear()
    del holder
    gc.collect()  # an unraisable error here fails the test (pytest's filterwarnings)
    assert actor.finished and actor.mailbox.pending() == 0


async def _held_in_a_with_block(b: Broker) -> None:
    async with b.borrow():
        await asyncio.get_running_loop().create_future()  # parked for good


async def _released_in_finally(b: Broker) -> None:
    conn = await b.borrow()
    try:
        await asyncio.get_running_loop().create_future()  # parked for good
    finally:
        await conn.release()


def _on_another_thread(work: Callable[[], None]) -> None:
    """Run ``work`` on a thread of its own; its failure is the test's failure."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


@pytest.mark.parametrize("thread", ["loop thread", "other thread"])
@pytest.mark.parametrize("holder", [_held_in_a_with_block, _released_in_finally])
async def test_a_holding_coroutine_finalized_inside_the_mailbox_lock(
    make_broker: MakeBroker,
    holder: Callable[[Broker], Any],
    thread: str,
) -> None:
    """A task dropped while it holds a driver: the collector closes its coroutine,
    whose ``__aexit__`` or ``finally`` gives the driver back from inside the
    collector, on whichever thread it runs, maybe inside the mailbox's lock."""
    b = make_broker(pool_min_size=0, pool_max_size=1)
    coro = holder(b)
    waiter = coro.send(None)  # runs up to its wait for the actor's answer
    await eventually(waiter.done, what="the actor handed over a driver")
    coro.send(None)  # takes the driver and parks in the body
    actor = b.actor_of(asyncio.get_running_loop())
    assert actor is not None and actor.snapshot()["in_use"] == 1
    holders = [coro]
    del coro, waiter

    def drop() -> None:
        with mailbox_lock_held(actor):
            holders.clear()  # the coroutine's finalizer closes it here

    if thread == "loop thread":
        drop()
    else:
        _on_another_thread(drop)
    await eventually(lambda: actor.snapshot()["in_use"] == 0, what="the driver came back")
    async with b.borrow(timeout=5) as again:
        await again.driver.execute_query("RETURN 1")
