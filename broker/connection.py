"""The handle a borrower holds: :class:`Connection`.

A :class:`Connection` is what ``broker.borrow()`` returns. It is awaitable and
an async context manager, and it gives exclusive use of one driver from the
current loop's pool until it is released. It keeps only its claim, its state
and its finalizer; the request protocol itself is the actor's
(:meth:`broker.actor.Actor.request` and :meth:`~broker.actor.Actor.abandon`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Generator
from types import TracebackType
from typing import Any, Protocol, Self

from neo4j import AsyncDriver

from broker import log
from broker.actor import Actor
from broker.asyncio_internals import running_loop
from broker.config import Neo4jConnectionConfig, check_timeout
from broker.errors import BrokerError
from broker.pooled import PooledDriver, is_connection_error

__all__ = ["Connection", "Lender"]


class Lender(Protocol):
    """Where a handle borrows from: a :class:`~broker.Broker`."""

    @property
    def config(self) -> Neo4jConnectionConfig: ...

    def actor_for(self, loop: asyncio.AbstractEventLoop) -> Actor: ...

    async def prepare_workspace(self, driver: AsyncDriver, workspace: str) -> str: ...


_NEW, _BORROWING, _HELD, _RELEASED = "new", "borrowing", "held", "released"

_SYNC_MISUSE = (
    "borrow() needs a running event loop: use 'async with broker.borrow() as conn' "
    "inside a coroutine; from synchronous code run that coroutine with broker.run(...) "
    "(or asyncio.run); broker.stats_sync() and broker.close() work without a loop"
)


class Connection:
    """Exclusive use of one pooled driver of the current event loop.

    Get one with ``await broker.borrow()`` or ``async with broker.borrow() as
    conn``. Release it with :meth:`release` (or by leaving the ``with``
    block); releasing twice is harmless. A release from another thread or
    event loop is routed to the owning loop's actor.

    A handle borrows once; borrow again for another driver.
    """

    # Borrowing and releasing are each claimed once, atomically, before
    # anything else happens: a handle awaited by two tasks (or two loops) at
    # once, or released by two threads at once, borrows and returns exactly
    # one driver. A claim is a non-blocking acquire of a lock of its own,
    # atomic by itself rather than thanks to the GIL, so this holds on
    # free-threaded Python too. Nothing ever waits for these locks.
    __slots__ = (
        "__weakref__",
        "_actor",
        "_borrow_claim",
        "_borrowed_at",
        "_broken",
        "_lender",
        "_pooled",
        "_release_claim",
        "_state",
        "_timeout",
    )

    def __init__(self, lender: Lender, timeout: float | None = None) -> None:
        self._state = _NEW
        self._lender = lender
        self._timeout = None if timeout is None else check_timeout(timeout)
        self._borrow_claim = threading.Lock()
        self._release_claim = threading.Lock()
        self._actor: Actor | None = None
        self._pooled: PooledDriver | None = None
        self._borrowed_at = 0.0
        self._broken = False

    # -- borrowing ---------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Self]:
        return self._acquire().__await__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and is_connection_error(exc):
            self._broken = True
        self._release()

    def __enter__(self) -> Connection:
        raise BrokerError(_SYNC_MISUSE)

    def __exit__(self, *exc_info: object) -> None:
        raise BrokerError(_SYNC_MISUSE)  # pragma: no cover - __enter__ already raised

    async def _acquire(self) -> Self:
        if not self._borrow_claim.acquire(blocking=False):
            raise BrokerError(self._claimed())
        self._state = _BORROWING
        try:
            loop = running_loop()
            if loop is None:
                raise BrokerError(_SYNC_MISUSE)
            lender = self._lender
            actor = lender.actor_for(loop)
            timeout = lender.config.borrow_timeout if self._timeout is None else self._timeout
            started = time.monotonic()
            request = actor.request(timeout)
            try:
                pooled = await request.waiter
            except BaseException:
                actor.abandon(request)
                raise
        except BaseException:
            if self._state is _BORROWING:  # nothing borrowed: the handle may try again
                self._state = _NEW
                self._borrow_claim.release()
            raise
        self._actor = actor
        self._pooled = pooled
        self._borrowed_at = now = time.monotonic()
        self._state = _HELD
        if log.enabled(log.DEBUG):
            waited = round((now - started) * 1000, 3)
            log.emit(log.DEBUG, "borrow", driver=pooled.id, wait_ms=waited, **actor.log_fields())
        return self

    # ``async with`` runs the borrow's coroutine itself, not one that awaits it.
    __aenter__ = _acquire

    def _claimed(self) -> str:
        if self._state is _BORROWING:
            return (
                "this handle is being borrowed by another task; call borrow() again "
                "for a driver of your own"
            )
        return "this handle has already borrowed once; call borrow() again"

    # -- using -------------------------------------------------------------

    @property
    def driver(self) -> AsyncDriver:
        """The borrowed driver; raises :class:`BrokerError` once released."""
        pooled = self._pooled
        if pooled is None or self._state is not _HELD:
            raise BrokerError(self._unusable())
        return pooled.driver

    async def get_driver(self) -> AsyncDriver:
        """The borrowed driver (the seed design's spelling of :attr:`driver`)."""
        return self.driver

    @property
    def database(self) -> str | None:
        """The configured default database, or None for the server's default."""
        return self._lender.config.database

    async def prepare_database(self, workspace: str) -> str:
        """Prepare ``workspace``'s database once per broker; return its name.

        Pass the name as ``database_=`` to the driver's queries.
        """
        return await self._lender.prepare_workspace(self.driver, workspace)

    def mark_broken(self) -> None:
        """Have the driver checked when it comes back (after a connection error)."""
        self._broken = True

    @property
    def released(self) -> bool:
        """True once the handle has been released."""
        return self._state is _RELEASED

    @property
    def borrowed(self) -> bool:
        """True while the handle holds a driver."""
        return self._pooled is not None and self._state is _HELD

    @property
    def pooled(self) -> PooledDriver | None:
        """The pooled driver while it is held (its id names it in the logs)."""
        return self._pooled

    def borrowed_from(self, lender: object) -> bool:
        """Whether this handle borrows from ``lender``."""
        return self._lender is lender

    # -- returning ---------------------------------------------------------

    async def release(self) -> None:
        """Give the driver back to its pool. Harmless when already released."""
        self._release()

    def release_sync(self) -> None:
        """:meth:`release` for code that cannot await (any thread)."""
        self._release()

    def _release(self) -> None:
        if self._borrow_claim.acquire(blocking=False):
            self._state = _RELEASED  # never borrowed, and now it never will
            return
        if self._state is not _HELD or not self._release_claim.acquire(blocking=False):
            return  # still borrowing (its borrower releases it), or released already
        self._state = _RELEASED
        pooled, actor = self._pooled, self._actor
        assert pooled is not None and actor is not None
        self._pooled = None
        delivered = actor.give_back(pooled, self._broken)
        if log.enabled(log.DEBUG):
            log.emit(
                log.DEBUG,
                "return",
                driver=pooled.id,
                hold_ms=round((time.monotonic() - self._borrowed_at) * 1000, 3),
                delivered=delivered,
                **actor.log_fields(),
            )

    def _unusable(self) -> str:
        if self._state in (_NEW, _BORROWING):
            return "this connection has not been borrowed yet: await it or use 'async with'"
        return "this connection was released; borrow again to get a driver"

    def __del__(self) -> None:
        # A handle dropped while held would shrink its pool for good. The
        # collector may run this anywhere, even inside the mailbox's lock on
        # the loop's thread: only the lock-free path is allowed here. Nobody
        # else can hold the handle now, so no claim is needed.
        if self._state is _HELD:
            try:
                self._state = _RELEASED
                if self._pooled is not None and self._actor is not None:
                    self._actor.give_back_soon(self._pooled, self._broken)
            except Exception:  # noqa: S110 - nothing may escape a finalizer
                pass

    def __repr__(self) -> str:
        pooled = f" driver #{self._pooled.id}" if self._pooled is not None else ""
        return f"<Connection {self._state}{pooled}>"
