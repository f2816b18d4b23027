"""The broker's exceptions.

Driver errors raised while a driver is being created (``AuthError``,
``ServiceUnavailable`` ...) reach the borrower unchanged; these classes cover
what the broker itself decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import neo4j.exceptions

__all__ = [
    "AuthBackoff",
    "BorrowTimeout",
    "BrokerAuthError",
    "BrokerClosed",
    "BrokerError",
    "TooManyWaiters",
    "UserLocked",
    "describe",
]


class BrokerError(Exception):
    """Base class of every error the broker raises itself."""


class BorrowTimeout(BrokerError, TimeoutError):
    """No driver could be handed out in time (or, from ``wait()``, the pool was not ready).

    ``pool`` holds the loop's counters at the moment the wait ended, so the
    message says whether the pool was full, still connecting or failing:
    where drivers are connecting and for how long, and the last creation
    error, which is also the exception's ``__cause__``.
    """

    def __init__(self, timeout: float, pool: Mapping[str, Any], ready: bool = False) -> None:
        self.timeout = timeout
        self.pool = dict(pool)
        self.ready = ready
        if ready:
            head = (
                f"pool not ready within {timeout:g} s: {pool.get('ready')} of "
                f"{pool.get('min_size')} drivers ready"
            )
        else:
            head = f"no driver available within {timeout:g} s"
        super().__init__(
            f"{head} (loop {pool.get('loop')}: in_use={pool.get('in_use')}, "
            f"available={pool.get('available')}, creating={pool.get('creating')}, "
            f"waiting={pool.get('waiting')}, max_size={pool.get('max_size')})" + _why(pool)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout, self.pool, self.ready))


def _why(pool: Mapping[str, Any]) -> str:
    """What the drivers being made are doing: where, how long, the last error."""
    text = ""
    creating = pool.get("creating") or 0
    if creating:
        plural = "driver" if creating == 1 else "drivers"
        seconds = (pool.get("connecting_ms") or 0) / 1000
        text += f"; {creating} {plural} connecting to {pool.get('target')} for {seconds:.1f} s"
    if pool.get("last_error"):
        text += f"; last creation error: {pool['last_error']}"
    return text


class BrokerAuthError(BrokerError, neo4j.exceptions.AuthError):
    """The broker did not log in, because of what it remembers of earlier logins.

    It is a ``neo4j.exceptions.AuthError`` too, so code that catches the
    driver's authentication errors catches it. The login that failed is its
    ``__cause__``.
    """

    @property
    def code(self) -> str:
        cause = self.__cause__
        if isinstance(cause, neo4j.exceptions.Neo4jError):
            return str(cause.code)
        return "Neo.ClientError.Security.Unauthorized"


class AuthBackoff(BrokerAuthError):
    """A login failed a moment ago: no new one is tried until the backoff ends.

    Every loop of the broker waits, so one stale password never sends the
    server a login per loop (Neo4j locks a user after a few failed logins,
    for every client of that user).
    """


class UserLocked(AuthBackoff):
    """The server locked the user after repeated failed logins, for every client of it."""


class TooManyWaiters(BrokerError):
    """A borrow would have queued beyond ``max_waiting``; the pool was left untouched."""


class BrokerClosed(BrokerError):
    """The broker, or this loop's pool, was closed and takes no more borrows."""


def describe(error: BaseException | None) -> str:
    """An error as ``Type: message`` for logs and reports, with its root cause.

    The driver often wraps the real reason (a refused certificate, a reset
    socket) in a general one such as "Unable to retrieve routing information".
    """
    if error is None:
        return "none"
    shown = _one_line(error)
    root, seen = error, {id(error)}
    while True:
        inner = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    if root is not error and str(root) not in str(error):
        shown += f" (caused by {_one_line(root)})"
    return shown


def _one_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
