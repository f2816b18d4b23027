"""A loop-safe driver: one object that stands for ``neo4j.AsyncDriver`` in every event loop.

Code that keeps a driver in an attribute and opens ``driver.session(...)`` in
each method can be handed a :class:`LoopSafeDriver` instead, made once
anywhere (at import time, without a loop). Each call is served in the
running loop's pool of its broker: a session is the pooled driver's own
session for its life, ``execute_query`` borrows for the call. Concurrent
sessions of one loop share a pooled driver, up to ``sessions_per_driver``
each (and never more than the driver's own socket pool), so a ``gather`` of
many sessions does not take as many drivers.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import neo4j
from neo4j.exceptions import DriverError

from broker.bookmarks import SharedBookmarkManager
from broker.lending import Borrower, Lease, LoopLeases, give, is_connection_error, take
from broker.session import LoopSafeSession

__all__ = ["LoopSafeDriver"]

_ENCRYPTED_SCHEMES = frozenset({"bolt+s", "bolt+ssc", "neo4j+s", "neo4j+ssc"})


class LoopSafeDriver(neo4j.AsyncDriver):
    """Stands for ``neo4j.AsyncDriver`` in any number of event loops at once.

    ``source`` is the broker, or a callable returning the broker to use now
    (the default broker follows ``broker.configure()``). It is an
    ``AsyncDriver`` for ``isinstance`` and type checks; the base class's
    ``__init__`` is never run, and each public method is its own.

    :meth:`close` ends this stand-in only: the broker's pools stay. Using it
    afterwards raises ``neo4j.exceptions.DriverError``, as a closed driver does.
    """

    def __init__(self, source: Borrower | Callable[[], Borrower]) -> None:
        # Not super().__init__(): this object owns no pool of its own.
        self._source: Callable[[], Borrower] = source if callable(source) else _fixed(source)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLeases]
        self._loops = weakref.WeakKeyDictionary()
        self._loops_lock = threading.Lock()  # for adding a loop only, never held across an await
        self._bookmarks = SharedBookmarkManager()
        self._ls_closed = False

    def __repr__(self) -> str:
        state = "closed" if self._ls_closed else "open"
        return f"<LoopSafeDriver {state} loops={len(self._loops)}>"

    def __del__(self, *_: Any) -> None:
        pass  # no sockets of its own: nothing to warn about

    # -- shares of the running loop's pooled drivers -----------------------------

    def _check_open(self) -> None:
        if self._ls_closed:
            raise DriverError("Driver closed")

    async def take_lease(self) -> Lease:
        """A share of a driver of the running loop's pool (for this driver's sessions)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        leases = self._loops.get(loop)
        if leases is None:
            with self._loops_lock:
                leases = self._loops.setdefault(loop, LoopLeases())
        broker = self._source()
        config = broker.config
        cap = min(config.sessions_per_driver, config.max_connection_pool_size)
        return await take(leases, broker, cap)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call one of the pooled driver's methods on a share taken for the call."""
        lease = await self.take_lease()
        try:
            assert lease.conn is not None
            return await getattr(lease.conn.driver, method)(*args, **kwargs)
        except BaseException as exc:
            if is_connection_error(exc):
                lease.broken = True
            raise
        finally:
            give(lease)

    # -- the driver's public API -------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End this stand-in; the pools stay, and open sessions finish as they are."""
        self._ls_closed = True

    @property
    def encrypted(self) -> bool:
        """Whether the broker's drivers encrypt (a ``+s``/``+ssc`` URI or ``encrypted=True``)."""
        config = self._source().config
        scheme = urllib.parse.urlsplit(config.uri).scheme.lower()
        return scheme in _ENCRYPTED_SCHEMES or bool(config.driver_options.get("encrypted"))

    @property
    def execute_query_bookmark_manager(self) -> neo4j.AsyncBookmarkManager:
        """The default bookmark manager of :meth:`execute_query`, one for every loop."""
        return self._bookmarks

    def session(self, **config: Any) -> neo4j.AsyncSession:
        """A session of the running loop's pool, taken on its first use."""
        self._check_open()
        return LoopSafeSession(self, config)

    async def execute_query(
        self, query_: Any, parameters_: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``AsyncDriver.execute_query`` on a pooled driver of the running loop."""
        # args: routing_, database_, impersonated_user_, bookmark_manager_ ...
        if len(args) < 4 and "bookmark_manager_" not in kwargs:
            kwargs["bookmark_manager_"] = self._bookmarks
        return await self._call("execute_query", query_, parameters_, *args, **kwargs)

    async def verify_connectivity(self, **config: Any) -> None:
        await self._call("verify_connectivity", **config)

    async def get_server_info(self, **config: Any) -> neo4j.ServerInfo:
        info: neo4j.ServerInfo = await self._call("get_server_info", **config)
        return info

    async def verify_authentication(self, auth: Any = None, *args: Any, **config: Any) -> bool:
        verified: bool = await self._call("verify_authentication", auth, *args, **config)
        return verified

    async def supports_multi_db(self) -> bool:
        supported: bool = await self._call("supports_multi_db")
        return supported

    async def supports_session_auth(self) -> bool:
        supported: bool = await self._call("supports_session_auth")
        return supported


def _fixed(broker: Borrower) -> Callable[[], Borrower]:
    def source() -> Borrower:
        return broker

    return source
