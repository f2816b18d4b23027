"""Closing a pool when its loop ends, even a pool born while the loop was ending.

``asyncio.run`` (and ``asyncio.Runner``) end a loop in steps: cancel the
tasks that exist now, wait for them, then shut down the loop's async
generators, then close the loop. A task's ``finally`` that borrows during
the first step starts the loop's actor after the list of tasks to cancel was
taken, so nobody would cancel it. Each actor therefore registers an async
generator with its loop: ``shutdown_asyncgens()`` closes it, and closing it
cancels the actor and waits until it has closed its drivers. A borrow that
comes even later (once generators are being shut down) is refused, on
asyncio's loops: uvloop does not say when that step has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from broker.asyncio_internals import shutting_down

__all__ = ["end_with_loop", "shutting_down"]


def end_with_loop(task: asyncio.Task[Any]) -> None:
    """Have the loop's ``shutdown_asyncgens()`` cancel ``task`` and wait for it.

    Call it in the task's loop, while the loop runs (the loop registers an
    async generator when it first runs, through the hooks it installs while
    running). Nothing happens if the task has ended by then.
    """
    _Guard(task)


class _Guard:
    """An async generator suspended for the task's life; the loop closes it at its end."""

    __slots__ = ("_closing", "_generator", "_task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._closing = False
        self._generator = self._wait()
        with contextlib.suppress(StopIteration):
            # Runs to its yield now; the loop's first-iteration hook registers it.
            self._generator.asend(None).send(None)
        # The task holds the guard through this callback for as long as it is pending.
        task.add_done_callback(self._disarm)

    async def _wait(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._closing = True
            task = self._task
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))

    def _disarm(self, _: object) -> None:
        # The task has ended: finish the generator now, so the loop has nothing
        # left to close and the collector nothing to finalize.
        if not self._closing:
            self._closing = True
            with contextlib.suppress(StopIteration):
                self._generator.aclose().send(None)
