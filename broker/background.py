"""Tasks an actor runs that report to nobody: held until they end.

The loop keeps only weak references to tasks, so an unheld one could be
collected before it finishes. Some are *lingering*: the closing of a driver
whose own I/O outlived the broker's timeout. A stopping pool waits for
those until its close deadline, then cancels them (they still close their
drivers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Background", "detach"]

# Tasks started by :func:`detach`, held until they end.
_held: set[asyncio.Task[Any]] = set()


def detach(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in the running loop as a task that reports to nobody, held until it ends."""
    task = asyncio.get_running_loop().create_task(work)
    _held.add(task)
    task.add_done_callback(_held.discard)


class Background:
    """One actor's tasks that report to nobody (touched only on its loop's thread)."""

    __slots__ = ("_detached", "_lingered", "_lingering", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, lingered: Callable[[], None]) -> None:
        self._loop = loop
        self._lingered = lingered  # called when a lingering task ends
        self._detached: set[asyncio.Task[None]] = set()
        self._lingering: set[asyncio.Task[None]] = set()

    def detach(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that reports to nobody, held until it ends."""
        task = self._loop.create_task(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    def linger(self, work: Coroutine[Any, Any, None]) -> None:
        """:meth:`detach` a closing that a stopping pool waits for (until its deadline)."""
        task = self._loop.create_task(work)
        self._lingering.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._lingering.discard(task)
        self._lingered()

    @property
    def lingering(self) -> bool:
        """Whether a lingering closing still runs."""
        return bool(self._lingering)

    def cancel_lingering(self) -> None:
        """The close deadline has passed: cancel them (each still closes its driver)."""
        for task in list(self._lingering):
            task.cancel()
