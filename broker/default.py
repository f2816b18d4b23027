"""The default broker behind ``broker.borrow()`` and the other module functions.

It is made from the environment (``Neo4jConnectionConfig.from_env()``) on
first use, or by :func:`configure`. A later :func:`configure` replaces it and
closes the old one, each of its pools in its own loop.
"""

from __future__ import annotations

import threading
import weakref

from broker import runner
from broker.broker import Broker
from broker.config import Neo4jConnectionConfig
from broker.connection import Connection
from broker.jobs import DriverFactory
from broker.loopsafe import LoopSafeDriver
from broker.stats import PoolStats

__all__ = [
    "aclose",
    "borrow",
    "check",
    "close",
    "close_process_pools",
    "close_with_process",
    "configure",
    "current",
    "drain",
    "driver",
    "get_broker",
    "pop_stats",
    "release",
    "resize",
    "stats",
    "stats_sync",
    "totals",
    "wait",
]

_lock = threading.Lock()
_default: Broker | None = None
# Brokers made beside the default one that close with the process's pools.
_others: weakref.WeakSet[Broker] = weakref.WeakSet()

_DEFAULT_CLOSED = "broker.configure(...) makes a new default broker"
_REPLACED = "it was replaced by broker.configure(); broker.borrow() uses the new default broker"


def configure(
    config: Neo4jConnectionConfig | None = None, *, driver_factory: DriverFactory | None = None
) -> Broker:
    """Make a new default broker (from the environment when ``config`` is None).

    The previous default, if any, stops taking borrows; its pools close in
    their own loops once their drivers come back. This call does not wait.
    """
    global _default
    new = Broker(config, driver_factory=driver_factory)
    new.closed_hint = _DEFAULT_CLOSED
    with _lock:
        old, _default = _default, new
    if old is not None:
        old.close_soon(_REPLACED)
    return new


def current() -> Broker | None:
    """The default broker if there is one now (never makes one)."""
    return _default


def reset() -> None:
    """Forget the default broker without closing it (for tests that close it themselves)."""
    global _default
    with _lock:
        _default = None


def get_broker() -> Broker:
    """The default broker, made from the environment if there is none yet."""
    global _default
    current = _default
    if current is None:
        with _lock:
            if _default is None:
                _default = Broker()
                _default.closed_hint = _DEFAULT_CLOSED
            current = _default
    return current


def driver() -> LoopSafeDriver:
    """A loop-safe stand-in for ``neo4j.AsyncDriver`` on the default broker (the current one)."""
    return LoopSafeDriver(get_broker)


def borrow(timeout: float | None = None) -> Connection:
    """Borrow from the default broker: ``async with broker.borrow() as conn``."""
    return get_broker().borrow(timeout)


async def release(connection: Connection) -> None:
    """Give a connection back to the default broker."""
    await get_broker().release(connection)


async def stats(timeout: float = 1.0) -> dict[str, PoolStats]:
    """Per-loop counters of the default broker (inside a loop)."""
    return await get_broker().stats(timeout)


def stats_sync(timeout: float = 1.0) -> dict[str, PoolStats]:
    """Per-loop counters of the default broker, from any thread."""
    return get_broker().stats_sync(timeout)


def totals() -> dict[str, int]:
    """Counters of the default broker summed over every loop it served."""
    return get_broker().totals()


def pop_stats(timeout: float = 1.0) -> dict[str, PoolStats]:
    """Per-loop counters of the default broker since the previous call, then reset them."""
    return get_broker().pop_stats(timeout)


async def wait(timeout: float | None = None) -> None:
    """Wait until this loop's pool of the default broker holds ``pool_min_size`` drivers."""
    await get_broker().wait(timeout)


async def check() -> int:
    """Verify this loop's idle drivers of the default broker; return how many were discarded."""
    return await get_broker().check()


def resize(min_size: int, max_size: int) -> None:
    """Change the pool bounds of every loop of the default broker (any thread)."""
    get_broker().resize(min_size, max_size)


def drain() -> None:
    """Replace every driver of the default broker (any thread): idle now, in use on return."""
    get_broker().drain()


async def aclose(timeout: float | None = None) -> None:
    """Close the default broker's pools (inside a loop)."""
    current = _default
    if current is not None:
        await current.aclose(timeout)


def close(timeout: float | None = None) -> None:
    """Close the default broker's pools, from any thread.

    Borrowing from it afterwards raises :class:`~broker.BrokerClosed`; call
    :func:`configure` for a working default again.
    """
    current = _default
    if current is not None:
        current.close(timeout)


def close_with_process(made: Broker) -> None:
    """Have :func:`close_process_pools` close ``made`` too (a broker of ``patch_neo4j``)."""
    with _lock:
        _others.add(made)


def close_process_pools(timeout: float | None = None) -> Broker | None:
    """Close every pool of this process, each in its own loop; return the default broker.

    The loops made by :func:`broker.run` end first, after their pools closed
    their drivers; then the default broker's other pools are closed, and
    those of running loops waited for, and the same for the brokers given
    to :func:`close_with_process`. Call it from a thread without a running
    loop (a worker's shutdown hook).
    """
    current = _default
    if timeout is None:
        timeout = current.config.close_timeout if current is not None else 10.0
    runner.shutdown(timeout)
    close(timeout)
    with _lock:
        others = list(_others)
        _others.clear()
    for other in others:
        other.close(timeout)
    return current
