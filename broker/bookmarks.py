"""A bookmark manager that any number of event loops and threads may share.

A ``neo4j.AsyncDriver`` has one ``execute_query_bookmark_manager``, which
chains every ``execute_query`` call of that driver. A loop-safe driver stands
for one driver used from many loops, so it keeps one manager for all of them:
what one loop wrote, a later ``execute_query`` in another loop reads. The
driver's own manager guards its set with a lock meant for one loop's
coroutines only; this one takes a thread lock, never held across an await.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

from neo4j.api import AsyncBookmarkManager

__all__ = ["SharedBookmarkManager"]


class SharedBookmarkManager(AsyncBookmarkManager):
    """Causal chaining across every loop and thread that uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bookmarks: set[str] = set()

    async def update_bookmarks(
        self, previous_bookmarks: Collection[str], new_bookmarks: Collection[str]
    ) -> None:
        if not new_bookmarks:
            return
        with self._lock:
            self._bookmarks.difference_update(previous_bookmarks)
            self._bookmarks.update(new_bookmarks)

    async def get_bookmarks(self) -> Collection[str]:
        with self._lock:
            return set(self._bookmarks)
