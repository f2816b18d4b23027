"""Shares of borrowed drivers, lent to a loop-safe driver's sessions in one event loop.

An ``AsyncDriver`` serves concurrent coroutines of its own loop, so several
sessions may use one borrowed driver at once. A :class:`Lease` is one
borrowed driver and how many sessions use it now; :class:`LoopLeases` holds
the leases of one (loop-safe driver, loop) pair. Both are only ever touched
from that loop's thread, so they need no lock. A driver goes back to its
pool when its last session ends, checked first if any session saw a
connection-level error on it. ``borrow()`` keeps its exclusive meaning: the
pool sees one borrow per lease.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from broker.config import Neo4jConnectionConfig
from broker.connection import Connection
from broker.pooled import is_connection_error

__all__ = ["Borrower", "Lease", "LoopLeases", "give", "is_connection_error", "take"]


class Borrower(Protocol):
    """Where leases borrow their drivers: a :class:`~broker.Broker`."""

    @property
    def config(self) -> Neo4jConnectionConfig: ...

    def borrow(self, timeout: float | None = None) -> Connection: ...


#: Sessions opened one after another on a kept driver before it goes back anyway.
MAX_REUSES = 100


class _Retry(Exception):
    """The borrow a share waited for was cancelled: look again."""


class Lease:
    """One borrowed driver and the sessions using it now."""

    __slots__ = ("broken", "broker", "conn", "owner", "reuses", "settling", "shares", "waiters")

    def __init__(self, broker: Borrower, owner: LoopLeases) -> None:
        self.broker = broker
        self.owner = owner
        #: Shares taken after it had none, without going back in between.
        self.reuses = 0
        #: A return is scheduled for the loop's next turn.
        self.settling = False
        #: None while the borrow is still on its way.
        self.conn: Connection | None = None
        self.shares = 1
        #: A session saw a connection-level error: no new shares, checked on return.
        self.broken = False
        self.waiters: list[asyncio.Future[None]] | None = None


class LoopLeases:
    """The leases of one loop-safe driver in one event loop."""

    __slots__ = ("leases",)

    def __init__(self) -> None:
        self.leases: list[Lease] = []


async def take(leases: LoopLeases, broker: Borrower, cap: int) -> Lease:
    """A share of a driver with room for one more session, borrowing one if none has."""
    while True:
        for lease in leases.leases:
            if lease.shares < cap and lease.broker is broker and not lease.broken:
                break
        else:
            return await _borrow(leases, broker)
        if lease.shares == 0:
            lease.reuses += 1
        lease.shares += 1
        if lease.conn is not None:
            return lease
        try:
            await _wait_for(lease)
        except _Retry:
            continue
        return lease


async def _wait_for(lease: Lease) -> None:
    """Wait for a lease whose borrow is on its way; our share is already counted."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if lease.waiters is None:
        lease.waiters = []
    lease.waiters.append(waiter)
    try:
        await waiter
    except BaseException:
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            give(lease)  # it arrived as we were cancelled
        elif not waiter.done():
            lease.waiters.remove(waiter)
            lease.shares -= 1
        raise


async def _borrow(leases: LoopLeases, broker: Borrower) -> Lease:
    lease = Lease(broker, leases)
    leases.leases.append(lease)
    try:
        conn = await broker.borrow()
    except BaseException as exc:
        leases.leases.remove(lease)
        _wake(lease, exc if isinstance(exc, Exception) else _Retry())
        raise
    lease.conn = conn
    _wake(lease, None)
    return lease


def _wake(lease: Lease, error: Exception | None) -> None:
    waiters, lease.waiters = lease.waiters, None
    for waiter in waiters or ():
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


def give(lease: Lease) -> None:
    """Give one share back; the driver goes back to its pool once none is left.

    Not at once: at the loop's next turn, so code that opens its next session
    right away (one ``execute_query`` after another) keeps the driver instead
    of paying a return and a borrow per call. After ``MAX_REUSES`` such
    reuses it goes back at once, so drains, lifetimes and checks still reach it.
    """
    lease.shares -= 1
    if lease.shares > 0 or lease.conn is None:
        return
    if lease.broken or lease.reuses >= MAX_REUSES:
        _return(lease)
    elif not lease.settling:
        lease.settling = True
        asyncio.get_running_loop().call_soon(_settle, lease)


def _settle(lease: Lease) -> None:
    lease.settling = False
    if lease.shares == 0 and lease.conn is not None:
        _return(lease)


def _return(lease: Lease) -> None:
    conn = lease.conn
    assert conn is not None
    lease.conn = None
    if lease in lease.owner.leases:
        lease.owner.leases.remove(lease)
    if lease.broken:
        conn.mark_broken()
    conn.release_sync()
