"""A Celery task's run on the asyncio pool's shared loop: its time limits, its end, its exit.

:class:`broker.celery_asyncio.AsyncioPool` runs Celery's tracer on a thread
and the task's coroutine on the one loop of the process. A :class:`Job` is
one task as that pool sees it. On the loop it:

- raises Celery's ``SoftTimeLimitExceeded`` inside the coroutine at the soft
  limit (the coroutine may catch it and clean up);
- cancels the coroutine at the hard limit, or when the task is revoked with
  ``terminate=True``; the tracer's thread then gets :class:`JobEnded`, which
  the pool turns into what Celery records (``TimeLimitExceeded``, or nothing
  more for a revoke, which Celery has already announced).

Limits count from the moment the task started on its thread, as Celery's own
pools count them; only the coroutine can be stopped, not synchronous code
around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

__all__ = ["Job", "JobEnded", "current_job"]

T = TypeVar("T")

_ids = itertools.count(1)
_local = threading.local()


class JobEnded(BaseException):
    """The pool ended a job's coroutine: its hard time limit, or a terminating revoke.

    A ``BaseException``, so that Celery's tracer lets it through instead of
    recording it as the task's own failure; the pool records the end.
    """

    def __init__(self, reason: str, limit: float | None = None) -> None:
        super().__init__(reason if limit is None else f"{reason} ({limit:g} s)")
        self.reason = reason
        self.limit = limit


def current_job() -> Job | None:
    """The job the calling thread runs for the pool, if any."""
    job: Job | None = getattr(_local, "job", None)
    return job


class Job:
    """One task run by the pool: its limits, and its coroutine while that runs on the loop."""

    def __init__(
        self,
        soft: float | None = None,
        hard: float | None = None,
        on_soft: Callable[[float], None] | None = None,
    ) -> None:
        self.id = next(_ids)  # what Celery knows the job by (its "worker pid")
        self.soft = soft or None
        self.hard = hard or None
        self.started = time.monotonic()
        self.ended: JobEnded | None = None
        self._on_soft = on_soft
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._soft_due = False

    @contextlib.contextmanager
    def running(self) -> Iterator[Job]:
        """Make this the calling thread's job; its limits count from now."""
        self.started = time.monotonic()
        _local.job = self
        try:
            yield self
        finally:
            _local.job = None

    def terminate(self) -> None:
        """Cancel the job's coroutine, now or as soon as it starts (from any thread)."""
        if self.ended is None:
            self.ended = JobEnded("terminated")
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._cancel)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` within the job's limits (on the shared loop)."""
        loop = asyncio.get_running_loop()
        self._loop, self._task = loop, asyncio.current_task()
        timers = [
            loop.call_at(self._deadline(limit), callback)
            for limit, callback in ((self.soft, self._soft_limit), (self.hard, self._hard_limit))
            if limit is not None
        ]
        try:
            if self.ended is not None:  # ended before its coroutine started
                coro.close()
                raise self.ended
            result = await (_steered(coro, self) if self.soft is not None else coro)
        except asyncio.CancelledError:
            if self.ended is not None:
                raise self.ended from None
            raise
        finally:
            self._task = None
            for timer in timers:
                timer.cancel()
        if self.ended is not None:  # it swallowed the cancellation: it still ended
            raise self.ended
        return result

    def _deadline(self, limit: float) -> float:
        assert self._loop is not None
        return self._loop.time() + max(0.0, self.started + limit - time.monotonic())

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _soft_limit(self) -> None:
        if self._task is None or self.ended is not None or self.soft is None:
            return
        self._soft_due = True
        self._task.cancel()  # wakes it wherever it waits; _steered raises the soft limit
        if self._on_soft is not None:
            self._on_soft(self.soft)

    def _hard_limit(self) -> None:
        if self.ended is None:
            self.ended = JobEnded("time limit", self.hard)
        self._cancel()

    def instead_of(self, cancelled: asyncio.CancelledError) -> BaseException:
        """What to raise in the coroutine for a cancellation: the soft limit, if it was that."""
        if not self._soft_due or self.ended is not None or self._task is None:
            return cancelled
        self._soft_due = False
        self._task.uncancel()
        soft: BaseException = SoftTimeLimitExceeded(self.soft)
        return soft


@types.coroutine
def _steered(coro: Coroutine[Any, Any, T], job: Job) -> Generator[Any, Any, T]:
    """Drive ``coro`` step by step, so the soft limit is raised where it waits."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            result: T = stop.value
            return result
        value, error = None, None
        try:
            value = yield step
        except GeneratorExit:
            coro.close()
            raise
        except asyncio.CancelledError as cancelled:
            error = job.instead_of(cancelled)
        except BaseException as other:
            error = other
