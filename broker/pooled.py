"""The pooled unit: one ``neo4j.AsyncDriver`` and what the pool knows about it.

Its capability predicates (``has_expired``, ``is_idle_for``, ``needs_check``)
are what the pool's decisions read; nothing here changes pool state.
"""

from __future__ import annotations

import itertools
from typing import Final

import neo4j.exceptions
from neo4j import AsyncDriver

from broker.errors import BrokerError

__all__ = ["CONNECTION_ERRORS", "PooledDriver", "is_connection_error"]

#: Errors after which a returned driver is checked before it is used again:
#: the connection may be gone (a timeout may have cut a query short on a
#: connection that no longer answers), or the driver's credentials may be
#: refused (a wrong or stale password, an expired token), in which case the
#: check fails and the driver is replaced by one made with fresh credentials.
CONNECTION_ERRORS: Final = (
    neo4j.exceptions.ServiceUnavailable,
    neo4j.exceptions.SessionExpired,
    TimeoutError,
    neo4j.exceptions.AuthError,
    neo4j.exceptions.AuthConfigurationError,
)

#: A security error that says nothing about the driver: the query was not allowed.
_NOT_THE_DRIVER = (neo4j.exceptions.Forbidden,)

_driver_ids = itertools.count(1)


class PooledDriver:
    """One ``neo4j.AsyncDriver`` and what the pool knows about it."""

    __slots__ = (
        "auth",
        "borrows",
        "created_at",
        "driver",
        "generation",
        "id",
        "last_checked",
        "last_used",
    )

    def __init__(
        self, driver: AsyncDriver, now: float, generation: int = 0, auth: object = None
    ) -> None:
        self.driver = driver
        #: What it logs in with (to tell a failed login's credentials apart; never shown).
        self.auth = auth
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

    def is_closed(self) -> bool:
        """Closed by someone else (a borrower's ``driver.close()``): never lend it again."""
        # The driver says so only through this flag; one that lacks it counts as open.
        return getattr(self.driver, "_closed", False) is True

    def __repr__(self) -> str:
        return f"<PooledDriver #{self.id}>"


def is_connection_error(exc: BaseException) -> bool:
    """An error after which the driver is checked: its connection or its credentials.

    Also inside an exception group (a ``TaskGroup``).
    """
    if isinstance(exc, BaseExceptionGroup):
        return any(is_connection_error(inner) for inner in exc.exceptions)
    if isinstance(exc, (BrokerError, *_NOT_THE_DRIVER)):
        return False
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    code = getattr(exc, "code", None)  # Neo4jError's status code, e.g. an authentication rate limit
    return isinstance(exc, neo4j.exceptions.Neo4jError) and str(code).startswith(
        "Neo.ClientError.Security."
    )
