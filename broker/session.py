"""A loop-safe driver's session: the pooled driver's own ``AsyncSession``, for its life.

``driver.session()`` is synchronous, and a share of a pooled driver may have
to wait for a borrow, so the share is taken on the session's first use
(``async with``, ``run``, ``begin_transaction``, ``execute_read`` ...). From
then on every call goes to the real session of the running loop's pooled
driver, so transactions, bookmarks and ``database=`` behave as the driver
documents them. Closing the session gives the share back.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Protocol, Self

import neo4j

from broker import log
from broker.background import detach
from broker.lending import Lease, give, is_connection_error


class LeaseSource(Protocol):
    """What a session takes its driver from: a loop-safe driver."""

    async def take_lease(self) -> Lease: ...


__all__ = ["LoopSafeSession"]


class LoopSafeSession(neo4j.AsyncSession):
    """Stands for ``neo4j.AsyncSession``; every call goes to the pooled driver's own session.

    It is an ``AsyncSession`` for ``isinstance`` and type checks; the base
    class's ``__init__`` is never run, and each public method is its own.
    """

    def __init__(self, owner: LeaseSource, config: dict[str, Any]) -> None:
        # Not super().__init__(): nothing of the base's state is used.
        self._ls_owner = owner
        self._ls_config = config
        self._ls_inner: neo4j.AsyncSession | None = None
        self._ls_lease: Lease | None = None
        self._ls_loop: asyncio.AbstractEventLoop | None = None
        self._ls_closed = False

    def __repr__(self) -> str:
        state = "closed" if self._ls_closed else "open" if self._ls_inner else "not started"
        return f"<LoopSafeSession {state}>"

    # -- the share -------------------------------------------------------------

    async def _open(self) -> neo4j.AsyncSession:
        if self._ls_closed:
            raise neo4j.exceptions.SessionError(self, "Session closed")
        inner = self._ls_inner
        if inner is not None:
            return inner
        lease = await self._ls_owner.take_lease()
        try:
            assert lease.conn is not None
            inner = lease.conn.driver.session(**self._ls_config)
        except BaseException:
            give(lease)
            raise
        self._ls_lease, self._ls_inner = lease, inner
        self._ls_loop = asyncio.get_running_loop()
        return inner

    def _end(self) -> None:
        lease, self._ls_lease, self._ls_inner = self._ls_lease, None, None
        if lease is not None:
            give(lease)

    def _saw(self, exc: BaseException) -> None:
        lease = self._ls_lease
        if lease is not None and is_connection_error(exc):
            lease.broken = True

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the real session's ``method``, opening it first; note a connection error."""
        inner = self._ls_inner or await self._open()
        try:
            return await getattr(inner, method)(*args, **kwargs)
        except BaseException as exc:
            self._saw(exc)
            raise

    async def _finish(self, method: str, *args: Any) -> None:
        """End the real session (if opened) with ``method``; closed and share back either way."""
        inner = self._ls_inner
        try:
            if inner is not None:
                await getattr(inner, method)(*args)
        except BaseException as exc:
            self._saw(exc)
            raise
        finally:
            self._ls_closed = True
            self._end()

    # -- the session's own API ---------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_value is not None:
            self._saw(exc_value)
        await self._finish("__aexit__", exc_type, exc_value, traceback)

    async def close(self) -> None:
        """Close the session and give its share of the pooled driver back."""
        await self._finish("close")

    def cancel(self) -> None:
        """Kill the work in flight (as ``AsyncSession.cancel``) and give the share back."""
        inner = self._ls_inner
        if inner is not None:
            inner.cancel()
        self._end()

    def closed(self) -> bool:
        return self._ls_closed

    async def run(self, query: Any, parameters: Any = None, **kwargs: Any) -> neo4j.AsyncResult:
        result: neo4j.AsyncResult = await self._call("run", query, parameters, **kwargs)
        return result

    async def last_bookmarks(self) -> neo4j.Bookmarks:
        inner = self._ls_inner or await self._open()
        return await inner.last_bookmarks()

    async def begin_transaction(self, *args: Any, **kwargs: Any) -> neo4j.AsyncTransaction:
        transaction: neo4j.AsyncTransaction = await self._call("begin_transaction", *args, **kwargs)
        return transaction

    async def execute_read(self, transaction_function: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._call("execute_read", transaction_function, *args, **kwargs)

    async def execute_write(self, transaction_function: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._call("execute_write", transaction_function, *args, **kwargs)

    def __del__(self, *_: Any) -> None:
        # Dropped without being closed: in its own loop, the real session is
        # closed (a result left streaming or a transaction left open would
        # keep a connection of the shared driver) and the share goes back.
        lease, loop, inner = self._ls_lease, self._ls_loop, self._ls_inner
        if lease is None or loop is None:
            return
        self._ls_lease = self._ls_inner = None
        try:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_close_dropped, inner, lease)
        except Exception:  # noqa: S110 - nothing may escape a finalizer
            pass


def _close_dropped(inner: neo4j.AsyncSession | None, lease: Lease) -> None:
    if log.enabled(log.WARNING):
        log.emit(log.WARNING, "session.dropped_unclosed", hint="close sessions, or use async with")
    detach(_close_then_give(inner, lease))


async def _close_then_give(inner: neo4j.AsyncSession | None, lease: Lease) -> None:
    try:
        if inner is not None:
            async with asyncio.timeout(lease.broker.config.close_timeout):
                await inner.close()
    except BaseException as exc:
        lease.broken = True  # its connection's state is unknown: checked on return
        if not isinstance(exc, Exception):
            raise
    finally:
        give(lease)
