"""A Celery worker pool that runs the bodies of async tasks on one shared event loop.

Celery's tracer (signals, result, acknowledgement) is synchronous, so it
runs on threads as in ``-P threads``; the coroutine of each
:func:`broker.celery.task` is handed to the one loop of the process and the
thread waits for it. ``--concurrency`` is how many tasks may be in flight;
they all share that loop's pool, bounded by ``pool_max_size``. Select it
with::

    CELERY_CUSTOM_WORKER_POOL=broker.celery_asyncio:AsyncioPool celery -A app worker -P custom -c 50

(or ``app.conf.worker_pool = "broker.celery_asyncio:AsyncioPool"``). When the
pool stops, after its running tasks finished, the loop ends and its pool
closes its drivers in it, before ``worker_shutdown`` closes the rest.

A task's ``soft_time_limit`` and ``time_limit`` (or the worker's
``task_soft_time_limit``, ``task_time_limit``) hold on the shared loop: at
the soft limit Celery's ``SoftTimeLimitExceeded`` is raised inside the
coroutine, at the hard one the coroutine is cancelled (its drivers go back)
and the task fails with ``TimeLimitExceeded`` (see :mod:`broker.celery_job`).
``revoke(id, terminate=True)`` cancels the task's coroutine the same way
(any signal); Celery records the task as revoked.
A task whose coroutine raises ``SystemExit`` or ``KeyboardInterrupt`` fails
with :class:`TaskExited`; the loop and the other tasks go on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

try:
    from celery.concurrency import thread
    from celery.concurrency.base import apply_target
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "broker.celery_asyncio needs Celery: pip install 'neo4j-loop-broker[celery]'"
    ) from exc

from broker import celery_job

__all__ = ["AsyncioPool", "SharedLoop", "TaskExited", "shared_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_current: SharedLoop | None = None


def shared_loop() -> SharedLoop | None:
    """The running shared loop of this process's :class:`AsyncioPool`, if any."""
    return _current


class TaskExited(Exception):
    """A task's coroutine raised ``SystemExit`` or ``KeyboardInterrupt``.

    Raised where the loop would have stopped: the task fails with it, the
    shared loop and its other tasks go on, as with ``-P threads``.
    """


async def _contained(coro: Coroutine[Any, Any, T]) -> T:
    # On the loop an exit would end run_forever, for every task at once.
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise TaskExited(
            f"the task raised {type(exc).__name__}({', '.join(map(repr, exc.args))}); "
            "it failed alone, the worker's event loop goes on"
        ) from exc


class SharedLoop:
    """One event loop on a thread of its own, taking coroutines from any thread."""

    def __init__(self, name: str = "broker-asyncio-pool") -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> SharedLoop:
        self._thread.start()
        self._ready.wait()
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the shared loop is not running")
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shared loop, next to the others; wait for its result.

        A ``SystemExit`` or ``KeyboardInterrupt`` it raises comes back as
        :class:`TaskExited`: it fails this call alone, the loop goes on.
        """
        if self._loop is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the shared loop is not running")
        job = celery_job.current_job()
        runner = job.run(coro) if job is not None else coro
        return asyncio.run_coroutine_threadsafe(_contained(runner), self._loop).result()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop: its pools close their drivers in it before it closes."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def _serve(self) -> None:
        # Runner.close() cancels what is left (the actors close their drivers),
        # then closes the loop.
        with asyncio.Runner() as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()


class AsyncioPool(thread.TaskPool):  # type: ignore[misc]
    """``-P threads`` whose async task bodies all run on one event loop of the process."""

    def on_start(self) -> None:
        global _current
        with _lock:
            if _current is None:
                _current = SharedLoop().start()
        super().on_start()

    def on_stop(self) -> None:
        global _current
        super().on_stop()  # the running tasks finish first
        with _lock:
            current, _current = _current, None
        if current is not None:
            current.stop()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: dict[int, celery_job.Job] = {}

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        timeout_callback: Callable[[bool, float], Any] | None = None,
        **_: Any,
    ) -> thread.ApplyResult:
        """Run the task on a thread as ``-P threads`` does, its coroutine within its limits.

        The limits are the task's (``time_limit``, ``soft_time_limit``, or
        those of its message), else the worker's (``task_time_limit``,
        ``--time-limit``), as Celery passes them to every pool.
        """
        job = celery_job.Job(
            soft=soft_timeout or self.options.get("soft_timeout"),
            hard=timeout or self.options.get("timeout"),
            on_soft=_soft_reporter(timeout_callback),
        )
        self._jobs[job.id] = job
        future = self.executor.submit(
            self._run_job, job, target, args, kwargs, callback, accept_callback, timeout_callback
        )
        return JobResult(future, job)

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """``revoke(id, terminate=True)``: cancel the task's coroutine, whatever the signal.

        ``pid`` is the job's id, which Celery took for the worker's pid when
        the task started; a job already done is left alone.
        """
        job = self._jobs.get(pid)
        if job is not None:
            job.terminate()

    def _run_job(
        self,
        job: celery_job.Job,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
        timeout_callback: Callable[[bool, float], Any] | None,
    ) -> None:
        try:
            with job.running():
                apply_target(
                    target,
                    args,
                    kwargs,
                    callback,
                    accept_callback,
                    pid=job.id,
                    propagate=(celery_job.JobEnded,),
                )
        except celery_job.JobEnded as ended:
            # The coroutine was cancelled: record the end as Celery's pools do.
            if ended.limit is not None and timeout_callback is not None:
                timeout_callback(False, ended.limit)
        finally:
            self._jobs.pop(job.id, None)

    def _get_info(self) -> dict[str, Any]:
        # Celery's own hook for a pool's part of `inspect stats`.
        info: dict[str, Any] = super()._get_info()
        current = _current
        info["event-loop"] = str(id(current.loop)) if current is not None else None
        return info


class JobResult(thread.ApplyResult):  # type: ignore[misc]
    """What Celery keeps of a task given to the pool; ``terminate`` cancels its coroutine."""

    def __init__(self, future: Future[Any], job: celery_job.Job) -> None:
        super().__init__(future)
        self.job = job

    def terminate(self, signal: Any = None) -> None:
        self.job.terminate()


def _soft_reporter(
    timeout_callback: Callable[[bool, float], Any] | None,
) -> Callable[[float], None] | None:
    """Celery's warning that a task passed its soft limit (called on the loop)."""
    if timeout_callback is None:
        return None

    def report(limit: float) -> None:
        timeout_callback(True, limit)

    return report
