"""What goes through an actor's mailbox.

Borrowers send :class:`Borrow`, :class:`Withdraw` and :class:`Return`;
:func:`broker.wait` and :func:`broker.check` send :class:`WaitReady` and
:class:`CheckNow`. The actor's own jobs (creating, checking and closing
drivers) report back with :class:`Created`, :class:`Checked` and
:class:`Closed`. Any thread may send :class:`StatsRequest`, :class:`Resize`,
:class:`Drain` and :class:`Shutdown`. :class:`Tick` is the actor's
maintenance clock.

Messages compare by identity: a :class:`Withdraw` names the very request it
cancels.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.pooled import PooledDriver
from broker.stats import PoolStats

__all__ = [
    "Borrow",
    "CheckNow",
    "Checked",
    "Closed",
    "Created",
    "Drain",
    "Message",
    "Request",
    "Resize",
    "Return",
    "Shutdown",
    "StatsRequest",
    "Tick",
    "WaitReady",
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
    #: When the pool took it (``time.monotonic()``), to measure the wait.
    queued_at: float = 0.0

    def pending(self) -> bool:
        """Still waiting for an answer (not served, failed or cancelled)."""
        return not self.waiter.done()


@dataclass(slots=True, eq=False)
class WaitReady:
    """Someone waits until the pool holds ``pool_min_size`` verified drivers."""

    waiter: asyncio.Future[None]
    timeout: float
    expiry: asyncio.TimerHandle | None = None

    def pending(self) -> bool:
        """Still waiting for an answer."""
        return not self.waiter.done()


@dataclass(slots=True, eq=False)
class CheckNow:
    """Verify every idle driver now; the answer is how many were discarded."""

    waiter: asyncio.Future[int]
    expiry: asyncio.TimerHandle | None = None

    def pending(self) -> bool:
        """Still waiting for an answer."""
        return not self.waiter.done()


#: What a caller waits on the pool for.
Request = Borrow | WaitReady | CheckNow


@dataclass(slots=True, eq=False)
class Withdraw:
    """A waiting caller was cancelled, or its time is up."""

    request: Borrow | WaitReady


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
    #: When the job started (``time.monotonic()``), as the pool recorded it.
    started: float = 0.0
    #: How long connecting and verifying took, when they succeeded.
    seconds: float = 0.0
    #: The error came from the ``on_create`` hook, after a good connection.
    hook_failed: bool = False
    #: What failed: ``credentials``, ``connect``, ``verify`` or ``on_create``.
    phase: str = ""


@dataclass(slots=True, eq=False)
class Checked:
    """A check job finished; ``error`` is None when the driver is fine.

    ``hook_error`` is what the ``on_return`` hook raised, if it ran and
    failed; ``verified`` says whether the driver was verified.
    """

    driver: PooledDriver
    error: BaseException | None = None
    hook_error: BaseException | None = None
    verified: bool = True


@dataclass(slots=True, eq=False)
class Closed:
    """A close job ended; ``finished`` is False if it was cancelled before it could run."""

    driver: PooledDriver
    finished: bool = True


@dataclass(slots=True, eq=False)
class StatsRequest:
    """Someone wants the pool's counters; ``reply`` may be called from any thread."""

    reply: Callable[[PoolStats], None]


@dataclass(slots=True, eq=False)
class Resize:
    """New pool sizes; ``version`` orders resizes sent from several threads."""

    min_size: int
    max_size: int
    version: int


@dataclass(slots=True, eq=False)
class Drain:
    """Replace every driver made before ``generation``: idle ones now, the others on return."""

    generation: int


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


Message = (
    Borrow
    | Withdraw
    | Return
    | Created
    | Checked
    | Closed
    | StatsRequest
    | Shutdown
    | Tick
    | WaitReady
    | CheckNow
    | Resize
    | Drain
)
