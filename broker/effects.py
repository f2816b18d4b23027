"""What the pool has its actor do: start jobs, answer callers, log.

The pool decides and never does I/O; the actor implements this protocol and
carries each decision out (jobs report back with a message).
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol

from broker.messages import Request
from broker.pooled import PooledDriver
from broker.stats import PoolStats

__all__ = ["Effects"]


class Effects(Protocol):
    """What the pool has its actor do (jobs report back with a message)."""

    def start_create(
        self, context: contextvars.Context | None, generation: int, started: float, verify: bool
    ) -> None:
        """Start a job that makes, verifies (if ``verify``) and prepares a new driver."""

    def start_check(self, pooled: PooledDriver, hook: bool, verify: bool) -> None:
        """Start a job that runs ``on_return`` (``hook``) and verifies ``pooled``.

        Without ``verify``, the driver is verified only if the hook fails.
        """

    def start_close(self, pooled: PooledDriver) -> None:
        """Start a job that closes ``pooled``."""

    def resolve(self, request: Request, value: Any) -> None:
        """Answer a waiting caller: a driver, a number, or None."""

    def refuse(self, request: Request, error: BaseException) -> None:
        """Fail a waiting caller with ``error``."""

    def forget(self, request: Request) -> None:
        """A cancelled caller left the queue: drop what the actor kept for it."""

    def reconnect_failed(self, stats: PoolStats) -> None:
        """Tell the application the pool stayed below its minimum too long."""

    def emit(
        self, level: int, event: str, context: contextvars.Context | None = None, **fields: Any
    ) -> None:
        """Log an event of this pool."""
