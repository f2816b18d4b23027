"""The broker's exceptions.

Driver errors raised while a driver is being created (``AuthError``,
``ServiceUnavailable`` ...) reach the borrower unchanged; these classes cover
what the broker itself decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BorrowTimeout", "BrokerClosed", "BrokerError"]


class BrokerError(Exception):
    """Base class of every error the broker raises itself."""


class BorrowTimeout(BrokerError, TimeoutError):
    """No driver could be handed out in time.

    ``pool`` holds the loop's counters at the moment the wait ended, so the
    message says whether the pool was full, still connecting or failing.
    """

    def __init__(self, timeout: float, pool: Mapping[str, Any]) -> None:
        self.timeout = timeout
        self.pool = dict(pool)
        super().__init__(
            f"no driver available within {timeout:g} s "
            f"(loop {pool.get('loop')}: in_use={pool.get('in_use')}, "
            f"available={pool.get('available')}, creating={pool.get('creating')}, "
            f"waiting={pool.get('waiting')}, max_size={pool.get('max_size')})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout, self.pool))


class BrokerClosed(BrokerError):
    """The broker, or this loop's pool, was closed and takes no more borrows."""
