"""The pooled unit (one ``AsyncDriver``) and the handle a borrower holds.

A :class:`Connection` is what ``broker.borrow()`` returns. It is awaitable and
an async context manager, and it gives exclusive use of one driver from the
current loop's pool until it is released.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import neo4j.exceptions
from neo4j import AsyncDriver

from broker import log
from broker.config import check_timeout
from broker.errors import BrokerClosed, BrokerError
from broker.messages import Borrow, Return, Withdraw

if TYPE_CHECKING:
    from broker.actor import Actor
    from broker.broker import Broker

__all__ = ["CONNECTION_ERRORS", "Connection", "PooledDriver"]

#: Errors after which a returned driver is checked before it is used again
#: (a timeout may have cut a query short on a connection that no longer answers).
CONNECTION_ERRORS: Final = (
    neo4j.exceptions.ServiceUnavailable,
    neo4j.exceptions.SessionExpired,
    TimeoutError,
)

_driver_ids = itertools.count(1)


class PooledDriver:
    """One ``neo4j.AsyncDriver`` and what the pool knows about it."""

    __slots__ = ("borrows", "created_at", "driver", "generation", "id", "last_checked", "last_used")

    def __init__(self, driver: AsyncDriver, now: float, generation: int = 0) -> None:
        self.driver = driver
        self.id = next(_driver_ids)
        self.created_at = now
        self.last_used = now
        self.last_checked = now
        #: How many times it was handed out (for ``max_borrows``).
        self.borrows = 0
        #: The pool's drain generation when it was made: older ones are replaced.
        self.generation = generation

    def has_expired(self, now: float, max_lifetime: float | None) -> bool:
        """Older than ``max_lifetime``: close it rather than reuse it."""
        return max_lifetime is not None and now - self.created_at >= max_lifetime

    def is_idle_for(self, now: float, max_idle_time: float | None) -> bool:
        """Unused for longer than ``max_idle_time``."""
        return max_idle_time is not None and now - self.last_used >= max_idle_time

    def needs_check(self, now: float, interval: float | None) -> bool:
        """Idle long enough that it should be verified before it is handed out."""
        if interval is None:
            return False
        return now - max(self.last_used, self.last_checked) > interval

    def __repr__(self) -> str:
        return f"<PooledDriver #{self.id}>"


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
        "_broker",
        "_pooled",
        "_release_claim",
        "_state",
        "_timeout",
    )

    def __init__(self, broker: Broker, timeout: float | None = None) -> None:
        self._state = _NEW
        self._broker = broker
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
        if exc is not None and _is_connection_error(exc):
            self._broken = True
        self._release()

    def __enter__(self) -> Connection:
        raise BrokerError(_SYNC_MISUSE)

    def __exit__(self, *exc_info: object) -> None:
        raise BrokerError(_SYNC_MISUSE)  # pragma: no cover - __enter__ already raised

    async def _acquire(self) -> Self:
        if not self._borrow_claim.acquire(blocking=False):
            if self._state is _BORROWING:
                raise BrokerError(
                    "this handle is being borrowed by another task; call borrow() again "
                    "for a driver of your own"
                )
            raise BrokerError("this handle has already borrowed once; call borrow() again")
        self._state = _BORROWING
        try:
            # One coroutine for the claim and the borrow: this is every borrow's path.
            broker = self._broker
            loop = asyncio._get_running_loop()
            if loop is None:
                raise BrokerError(_SYNC_MISUSE)
            actor = broker._actor_for(loop)
            timeout = broker.config.borrow_timeout if self._timeout is None else self._timeout
            waiter: asyncio.Future[PooledDriver] = loop.create_future()
            task = asyncio.current_task(loop)
            request = Borrow(waiter, timeout, task, contextvars.copy_context())
            started = time.monotonic()
            if not actor.post(request):
                raise BrokerClosed(f"the pool of loop {actor.key} has stopped")
            try:
                pooled = await waiter
            except BaseException:
                # Also a GeneratorExit from the collector closing this coroutine:
                # posting never waits on a lock (Actor.post).
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed to us just as we were cancelled: give it straight back.
                    actor.post(Return(waiter.result()))
                elif waiter.cancelled():
                    actor.post(Withdraw(request))
                raise
        except BaseException:
            if self._state is _BORROWING:  # nothing borrowed: the handle may try again
                self._state = _NEW
                self._borrow_claim.release()
            raise
        now = time.monotonic()
        self._actor = actor
        self._pooled = pooled
        self._borrowed_at = now
        self._state = _HELD
        if log.enabled(log.DEBUG):
            log.emit(
                log.DEBUG,
                "borrow",
                driver=pooled.id,
                wait_ms=round((now - started) * 1000, 3),
                **actor.log_fields(),
            )
        return self

    # ``async with`` runs the borrow's coroutine itself, not one that awaits it.
    __aenter__ = _acquire

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
        return self._broker.config.database

    async def prepare_database(self, workspace: str) -> str:
        """Prepare ``workspace``'s database once per broker; return its name.

        Pass the name as ``database_=`` to the driver's queries.
        """
        driver = self.driver
        actor = self._actor
        assert actor is not None
        return await self._broker._prepare(actor, driver, workspace)

    def mark_broken(self) -> None:
        """Have the driver checked when it comes back (after a connection error)."""
        self._broken = True

    @property
    def released(self) -> bool:
        """True once the handle has been released."""
        return self._state is _RELEASED

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
        delivered = actor.send(Return(pooled, self._broken))
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
                    self._actor.post_soon(Return(self._pooled, self._broken))
            except Exception:  # noqa: S110 - nothing may escape a finalizer
                pass

    def __repr__(self) -> str:
        pooled = f" driver #{self._pooled.id}" if self._pooled is not None else ""
        return f"<Connection {self._state}{pooled}>"


def _is_connection_error(exc: BaseException) -> bool:
    """A connection-level error, also inside an exception group (a ``TaskGroup``)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_connection_error(inner) for inner in exc.exceptions)
    return isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, BrokerError)
