"""The pool's two orders: which idle driver goes out next, which borrower is served next.

Both are plain containers with the policy in their names, so the pool's
decisions read as "take the next idle driver", "serve the next waiter".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from broker.messages import Borrow
from broker.pooled import PooledDriver

__all__ = ["IdleDrivers", "Waiters"]


class IdleDrivers(deque[PooledDriver]):
    """Idle drivers, handed out most recently used first.

    The driver that came back last goes out next, so a quiet pool keeps
    using the same few drivers while the others stay idle long enough for
    ``max_idle_time`` to close them; shrinking closes the least recently
    used first. (A deque, least recently used on the left: every borrow
    reads it, so its sizes and truth are the deque's own.)
    """

    __slots__ = ()

    #: A driver becomes idle: it is the next to go out.
    put = deque.append
    #: Remove and return the most recently used driver.
    take = deque.pop

    def next(self) -> PooledDriver:
        """The driver :meth:`take` would hand out (the pool must not be empty)."""
        return self[-1]

    def least_recent(self) -> PooledDriver:
        """The driver idle the longest (the pool must not be empty)."""
        return self[0]

    def take_least_recent(self) -> PooledDriver:
        """Remove and return the driver idle the longest."""
        return self.popleft()

    def take_all(self) -> list[PooledDriver]:
        """Empty the list; the drivers, least recently used first."""
        drivers = list(self)
        self.clear()
        return drivers


class Waiters(deque[Borrow]):
    """Borrowers waiting for a driver, served first come, first served.

    A borrower cancelled while it waits stays in the queue until its
    ``Withdraw`` arrives; whoever meets it first drops it and calls
    ``skipped`` (which counts the cancellation), so it is never served.
    """

    __slots__ = ("_skipped",)

    def __init__(self, skipped: Callable[[Borrow], None]) -> None:
        super().__init__()
        self._skipped = skipped

    def discard(self, borrow: Borrow) -> bool:
        """Take ``borrow`` out of the queue; False if it was not there."""
        try:
            self.remove(borrow)
        except ValueError:
            return False
        return True

    def first(self) -> Borrow | None:
        """The oldest borrower still waiting, left in the queue (cancelled ones dropped)."""
        while self:
            borrow = self[0]
            if not borrow.waiter.done():  # Borrow.pending(), inline: every waiting borrow's path
                return borrow
            self._skipped(self.popleft())
        return None

    def next(self) -> Borrow | None:
        """Remove and return the oldest borrower still waiting."""
        borrow = self.first()
        if borrow is not None:
            self.popleft()
        return borrow

    def arrived_by(self, moment: float) -> list[Borrow]:
        """Borrowers still waiting that were queued at or before ``moment``, oldest first."""
        return [b for b in self if b.pending() and b.queued_at <= moment]

    def pending(self) -> int:
        """How many borrowers really wait (cancelled ones not counted)."""
        return sum(1 for borrow in self if borrow.pending())

    def take_all(self) -> list[Borrow]:
        borrows = list(self)
        self.clear()
        return borrows

    def nth(self, index: int) -> Borrow:
        return self[index]
