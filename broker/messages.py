"""What goes through an actor's mailbox.

Borrowers send :class:`Borrow`, :class:`Withdraw` and :class:`Return`. The
actor's own jobs (creating, checking and closing drivers) report back with
:class:`Created`, :class:`Checked` and :class:`Closed`. Other threads ask for
:class:`StatsRequest` and :class:`Shutdown`. :class:`Tick` is the actor's
maintenance clock.

Messages compare by identity: a :class:`Withdraw` names the very
:class:`Borrow` it cancels.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.connection import PooledDriver

__all__ = [
    "Borrow",
    "Checked",
    "Closed",
    "Created",
    "Message",
    "Return",
    "Shutdown",
    "StatsRequest",
    "Tick",
    "Withdraw",
]


@dataclass(slots=True, eq=False)
class Borrow:
    """A borrower asks for a driver; the answer is set on ``waiter``."""

    waiter: asyncio.Future[PooledDriver]
    timeout: float
    #: The borrowing task, to notice handles abandoned when a loop ends.
    task: asyncio.Task[Any] | None
    #: The borrower's context: a driver created for it logs with its fields.
    context: contextvars.Context
    expiry: asyncio.TimerHandle | None = None

    def pending(self) -> bool:
        """Still waiting for an answer (not served, failed or cancelled)."""
        return not self.waiter.done()


@dataclass(slots=True, eq=False)
class Withdraw:
    """A waiting borrower was cancelled and no longer wants a driver."""

    borrow: Borrow


@dataclass(slots=True, eq=False)
class Return:
    """A driver comes back; ``broken`` after a connection-level error."""

    driver: PooledDriver
    broken: bool = False


@dataclass(slots=True, eq=False)
class Created:
    """A creation job finished with a driver or with the error it met."""

    driver: PooledDriver | None
    error: BaseException | None = None
    #: The context the job ran in (the borrower's): its events are logged in it.
    context: contextvars.Context | None = None


@dataclass(slots=True, eq=False)
class Checked:
    """A health check finished; ``error`` is None when the driver is fine."""

    driver: PooledDriver
    error: BaseException | None = None


@dataclass(slots=True, eq=False)
class Closed:
    """A close job ended; ``finished`` is False if it was cancelled before it could run."""

    driver: PooledDriver
    finished: bool = True


@dataclass(slots=True, eq=False)
class StatsRequest:
    """Someone wants the pool's counters; ``reply`` may be called from any thread."""

    reply: Callable[[dict[str, Any]], None]


@dataclass(slots=True, eq=False)
class Shutdown:
    """Stop taking borrows, close every driver, then stop.

    Drivers in use get ``timeout`` seconds to come back before they are
    closed anyway. ``done`` is called once the actor has stopped.
    """

    reason: str
    timeout: float
    done: Callable[[], None] | None = None


@dataclass(slots=True, eq=False)
class Tick:
    """Time for maintenance: idle and old drivers, the minimum size, deadlines."""


Message = Borrow | Withdraw | Return | Created | Checked | Closed | StatsRequest | Shutdown | Tick
