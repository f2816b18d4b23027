"""The pool's two orders: which idle driver goes out next, which borrower is served next.

Both are plain containers with the policy in their names, so the pool's
decisions read as "take the next idle driver", "serve the next waiter".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from broker.messages import Borrow
from broker.pooled import PooledDriver

__all__ = ["IdleDrivers", "Waiters"]


class IdleDrivers:
    """Idle drivers, handed out most recently used first.

    The driver that came back last goes out next, so a quiet pool keeps
    using the same few drivers while the others stay idle long enough for
    ``max_idle_time`` to close them; shrinking closes the least recently
    used first.
    """

    __slots__ = ("_drivers",)

    def __init__(self) -> None:
        self._drivers: deque[PooledDriver] = deque()  # least recently used on the left

    def put(self, pooled: PooledDriver) -> None:
        """A driver becomes idle: it is the next to go out."""
        self._drivers.append(pooled)

    def next(self) -> PooledDriver:
        """The driver :meth:`take` would hand out (the pool must not be empty)."""
        return self._drivers[-1]

    def take(self) -> PooledDriver:
        """Remove and return the most recently used driver."""
        return self._drivers.pop()

    def least_recent(self) -> PooledDriver:
        """The driver idle the longest (the pool must not be empty)."""
        return self._drivers[0]

    def take_least_recent(self) -> PooledDriver:
        """Remove and return the driver idle the longest."""
        return self._drivers.popleft()

    def remove(self, pooled: PooledDriver) -> None:
        self._drivers.remove(pooled)

    def take_all(self) -> list[PooledDriver]:
        """Empty the list; the drivers, least recently used first."""
        drivers = list(self._drivers)
        self._drivers.clear()
        return drivers

    def __len__(self) -> int:
        return len(self._drivers)

    def __bool__(self) -> bool:
        return bool(self._drivers)

    def __iter__(self) -> Iterator[PooledDriver]:
        return iter(list(self._drivers))


class Waiters:
    """Borrowers waiting for a driver, served first come, first served.

    A borrower cancelled while it waits stays in the queue until its
    ``Withdraw`` arrives; whoever meets it first drops it and calls
    ``skipped`` (which counts the cancellation), so it is never served.
    """

    __slots__ = ("_queue", "_skipped")

    def __init__(self, skipped: Callable[[Borrow], None]) -> None:
        self._queue: deque[Borrow] = deque()
        self._skipped = skipped

    def append(self, borrow: Borrow) -> None:
        self._queue.append(borrow)

    def remove(self, borrow: Borrow) -> bool:
        """Take ``borrow`` out of the queue; False if it was not there."""
        try:
            self._queue.remove(borrow)
        except ValueError:
            return False
        return True

    def first(self) -> Borrow | None:
        """The oldest borrower still waiting, left in the queue (cancelled ones dropped)."""
        queue = self._queue
        while queue:
            borrow = queue[0]
            if borrow.pending():
                return borrow
            self._skipped(queue.popleft())
        return None

    def next(self) -> Borrow | None:
        """Remove and return the oldest borrower still waiting."""
        borrow = self.first()
        if borrow is not None:
            self._queue.popleft()
        return borrow

    def arrived_by(self, moment: float) -> list[Borrow]:
        """Borrowers still waiting that were queued at or before ``moment``, oldest first."""
        return [b for b in self._queue if b.pending() and b.queued_at <= moment]

    def pending(self) -> int:
        """How many borrowers really wait (cancelled ones not counted)."""
        return sum(1 for borrow in self._queue if borrow.pending())

    def take_all(self) -> list[Borrow]:
        borrows = list(self._queue)
        self._queue.clear()
        return borrows

    def nth(self, index: int) -> Borrow:
        return self._queue[index]

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)
