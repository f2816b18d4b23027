"""Driver creations of one pool: which run now, and what the failed ones taught.

After a creation fails with nobody waiting, the pool stops refilling its
minimum for a while (1 s, doubling up to 30 s), so a server that is down is
not hammered by every loop's maintenance; a success resets it.
"""

from __future__ import annotations

__all__ = ["Creations"]

_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 30.0


class Creations:
    """Creations under way (by start time), the last error and the refill backoff."""

    __slots__ = ("_backoff", "_retry_at", "failing_since", "last_error", "started")

    def __init__(self) -> None:
        #: When each creation still running started (``time.monotonic()``).
        self.started: list[float] = []
        #: The last creation error, until a creation succeeds.
        self.last_error: BaseException | None = None
        #: Since when creations fail with no success in between.
        self.failing_since: float | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    def begin(self, now: float) -> None:
        self.started.append(now)

    def end(self, started: float) -> None:
        self.started.remove(started)

    def oldest(self) -> float | None:
        """When the longest-running creation started, if one runs."""
        return min(self.started, default=None)

    def succeeded(self) -> None:
        """A creation made a driver: forget past failures."""
        self._backoff = 0.0
        self.last_error = None
        self.failing_since = None

    def failed(self, error: BaseException, now: float) -> None:
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = now

    def back_off(self, now: float) -> None:
        """Wait before the next refill: 1 s, doubling up to 30 s."""
        self._backoff = min(max(_BACKOFF_FIRST, self._backoff * 2), _BACKOFF_MAX)
        self._retry_at = now + self._backoff

    def may_refill(self, now: float) -> bool:
        """Whether the pool may start creations for its minimum now."""
        return now >= self._retry_at

    def overdue(self, now: float, limit: float | None) -> float | None:
        """Seconds of failing once they reach ``limit`` (then once per ``limit``), else None."""
        since = self.failing_since
        if limit is None or since is None or now - since < limit:
            return None
        self.failing_since = now
        return now - since
