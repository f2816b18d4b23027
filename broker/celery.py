"""Celery integration: one pool per worker thread, kept across tasks, closed at shutdown.

Install with ``neo4j-loop-broker[celery]``. In the module that defines the Celery app::

    import broker
    import broker.celery

    app = Celery("myapp")
    broker.celery.setup(app)          # or setup(app, Neo4jConnectionConfig(...))

    @broker.celery.task(app)
    async def ingest(workspace: str) -> int:
        async with broker.borrow() as conn:
            db = await conn.prepare_database(workspace)
            ...

What :func:`setup` wires, whatever the pool (``-P threads``, ``solo``,
``prefork``):

- the default broker (``broker.borrow()``) is configured when the worker
  starts (``worker_init``), again in each prefork child
  (``worker_process_init``), or lazily before the first task of a process
  that saw neither; configuring never connects;
- before each task the task's id and name are bound as structlog context
  variables (``task_id``, ``task_name``), so every broker event of the task
  carries them; they are removed after the task, so nothing reaches the next
  task on the same thread (the events join the worker's log at its
  ``--loglevel``, once each: see :func:`broker.log.configure`);
- with ``ready_check=True``, once the worker is ready (``worker_ready``) a
  thread checks that the database answers (:func:`check_ready`: the pool's
  minimum and one borrowed driver, in a loop of its own, closed afterwards)
  and logs ``celery.ready`` or, with the error, ``celery.not_ready``; the
  worker runs either way. The signal fires where tasks are consumed, so in
  a prefork worker the check connects in the master; it is the only thing
  :func:`setup` wires that connects;
- with ``patch_neo4j=True``, :func:`broker.patch_neo4j` is on in every
  worker process (at setup, ``worker_init`` and ``worker_process_init``);
- at shutdown (``worker_shutdown`` in the worker process,
  ``worker_process_shutdown`` in each prefork child) every loop made by
  :func:`broker.run` is closed after its pools closed their drivers, then
  the default broker is closed. A ``celery.pools_closed`` event reports the
  totals.

``worker_process_init`` alone is not enough: a ``-P threads`` worker never
sends it. After a fork the child never uses a driver of its parent: the
broker forgets inherited pools without touching them, and the child gets a
default broker of its own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import structlog

try:
    from celery import current_task, signals
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "broker.celery needs Celery: pip install 'neo4j-loop-broker[celery]'"
    ) from exc

from broker import celery_asyncio, default, log, patch, runner
from broker.config import Neo4jConnectionConfig
from broker.errors import describe
from broker.patch import PatchHandle

__all__ = ["TASK_CONTEXT_KEYS", "check_ready", "close_pools", "disconnect", "setup", "task"]

P = ParamSpec("P")
R = TypeVar("R")

#: The structlog context variables bound for the duration of each task.
TASK_CONTEXT_KEYS = ("task_id", "task_name")

_lock = threading.Lock()
_config: Neo4jConnectionConfig | None = None
_configured_pid: int | None = None  # the process whose default broker we configured
_ready_check = False
_patch = False
_patch_handle: PatchHandle | None = None


def setup(
    app: Any,
    config: Neo4jConnectionConfig | None = None,
    *,
    ready_check: bool = False,
    patch_neo4j: bool = False,
) -> None:
    """Wire ``app``'s worker lifecycle to the default broker.

    ``config`` configures the default broker when the worker starts. With
    None, the configuration of a default broker made earlier in the process
    (``broker.configure(...)``) is kept; without one it is read from the
    environment (``NEO4J_URI``, ``NEO4J_USERNAME``, ``NEO4J_PASSWORD`` ...).
    Call it in the app's module, before the worker starts. Calling it again
    replaces the configuration; the signal handlers are connected once per
    process.

    With ``ready_check``, the worker checks at ``worker_ready`` that the
    database can be reached with this configuration and logs the result
    (see :func:`check_ready`).

    With ``patch_neo4j``, :func:`broker.patch_neo4j` is turned on now and
    again in every worker process (``worker_init``, ``worker_process_init``),
    so code that makes its own ``AsyncGraphDatabase.driver(...)`` gets a
    loop-safe driver in every task.
    """
    global _config, _configured_pid, _ready_check, _patch
    if not hasattr(app, "task"):
        raise TypeError(f"expected a Celery app, got {type(app).__name__}")
    with _lock:
        _config = config
        _configured_pid = None  # the next worker start (or task) configures again
        _ready_check = ready_check
        _patch = patch_neo4j
    _patch_once()
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False, dispatch_uid=_uid(handler))


def disconnect() -> None:
    """Undo :func:`setup`'s signal wiring (for tests that start workers in-process)."""
    global _config, _configured_pid, _ready_check, _patch, _patch_handle
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=_uid(handler))
    with _lock:
        _config = None
        _configured_pid = None
        _ready_check = False
        _patch = False
        handle, _patch_handle = _patch_handle, None
    if handle is not None:
        handle.undo()


def task(app: Any, **options: Any) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Any]:
    """Register an ``async def`` function as a task of ``app``, run with :func:`broker.run`.

    ``options`` go to ``app.task`` unchanged (``name``, ``bind``, ``acks_late``
    ...). Each call runs on the worker thread's persistent loop, so the
    thread's pool is reused by its next tasks; under
    :class:`broker.celery_asyncio.AsyncioPool`, on the process's one shared
    loop instead. The task's id and name are bound inside its coroutine, so
    its events carry them wherever it runs, next to other tasks on one loop.
    """

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"broker.celery.task expects an 'async def' function, got {fn!r}; "
                "use app.task for plain functions"
            )

        @functools.wraps(fn)
        def run_on_thread_loop(*args: P.args, **kwargs: P.kwargs) -> R:
            # Read here, on the thread Celery runs the task on (its task stack
            # is thread-local), and bound where the coroutine runs.
            request = getattr(current_task, "request", None)
            task_id = getattr(request, "id", None)
            task_name = getattr(current_task, "name", None) if task_id is not None else None
            coro = _in_task_context(fn(*args, **kwargs), task_id, task_name)
            shared = celery_asyncio.shared_loop()
            if shared is not None:
                return shared.run(coro)
            return runner.run(coro)

        return app.task(**options)(run_on_thread_loop)

    return decorate


async def _in_task_context(
    coro: Coroutine[Any, Any, R], task_id: str | None, task_name: str | None
) -> R:
    """Await ``coro`` with the task's id and name bound in the coroutine's own context."""
    if task_id is not None:
        structlog.contextvars.bind_contextvars(task_id=task_id, task_name=task_name)
    return await coro


def close_pools(timeout: float | None = None, *, reason: str = "shutdown") -> dict[str, int]:
    """Close every pool of this process, each in its own loop; return the totals.

    First every loop made by :func:`broker.run` is closed (its actors close
    their drivers in that loop before it ends), then the default broker is
    closed (pools of loops that are still running elsewhere are waited for).
    Call it from a thread without a running loop. The handlers wired by
    :func:`setup` call it at worker shutdown.
    """
    global _configured_pid
    current = default.close_process_pools(timeout)
    totals = current.totals() if current is not None else {}
    with _lock:
        _configured_pid = None
    log.emit(
        log.INFO,
        "celery.pools_closed",
        reason=reason,
        pid=os.getpid(),
        live_loops=len(current.stats_sync()) if current is not None else 0,
        **totals,
    )
    return totals


def check_ready(timeout: float | None = None) -> bool:
    """Check that the default broker reaches the database; log and return the result.

    In a loop of its own, waits for the pool's ``pool_min_size`` verified
    drivers (:func:`broker.wait`), then borrows one and has the server
    answer, so the check connects even with a minimum of 0. The loop's pool
    is closed before it returns, so it may be called from any thread
    without a running loop. ``timeout`` (default ``borrow_timeout``) bounds
    the wait and the borrow together. Logs ``celery.ready`` (with the
    seconds it took) or ``celery.not_ready`` (with the error).
    """
    _configure_once()
    started = time.monotonic()
    try:
        asyncio.run(_reach_database(timeout))
    except Exception as exc:
        seconds = round(time.monotonic() - started, 3)
        log.emit(log.ERROR, "celery.not_ready", error=describe(exc), seconds=seconds)
        return False
    log.emit(log.INFO, "celery.ready", seconds=round(time.monotonic() - started, 3))
    return True


async def _reach_database(timeout: float | None) -> None:
    budget = default.get_broker().config.borrow_timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    await default.wait(budget)
    async with default.borrow(max(0.0, deadline - time.monotonic())) as conn:
        await conn.driver.verify_connectivity()


# -- signal handlers -----------------------------------------------------------


def _uid(handler: Callable[..., None]) -> str:
    return f"broker.celery.{handler.__name__}"


def _configure_once() -> None:
    """Give this process its default broker, once (never connects)."""
    global _configured_pid
    pid = os.getpid()
    if _configured_pid == pid:
        return
    with _lock:
        if _configured_pid != pid:
            config = _config
            made = default.current()  # by the app, or inherited
            if config is None and made is not None:
                config = made.config
            default.configure(config)
            _configured_pid = pid


def _patch_once() -> None:
    """Turn ``broker.patch_neo4j()`` on in this process if :func:`setup` asked for it."""
    global _patch_handle
    with _lock:
        if _patch and (_patch_handle is None or not patch.is_patched()):
            _patch_handle = patch.patch_neo4j()


def _on_worker_init(**_: Any) -> None:
    _configure_once()
    _patch_once()


def _on_worker_process_init(**_: Any) -> None:
    # A prefork child: the parent's pools were forgotten at fork; start afresh.
    _configure_once()
    _patch_once()


def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    _configure_once()
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=getattr(task, "name", None))


def _on_task_postrun(**_: Any) -> None:
    structlog.contextvars.unbind_contextvars(*TASK_CONTEXT_KEYS)


def _on_worker_ready(**_: Any) -> None:
    if _ready_check:
        # Off the consumer's thread: the worker takes tasks while it runs.
        threading.Thread(target=check_ready, name="broker-ready-check", daemon=True).start()


def _on_worker_shutdown(**_: Any) -> None:
    close_pools(reason="worker_shutdown")


def _on_worker_process_shutdown(**_: Any) -> None:
    close_pools(reason="worker_process_shutdown")


_HANDLERS: tuple[tuple[Any, Callable[..., None]], ...] = (
    (signals.worker_init, _on_worker_init),
    (signals.worker_process_init, _on_worker_process_init),
    (signals.task_prerun, _on_task_prerun),
    (signals.task_postrun, _on_task_postrun),
    (signals.worker_ready, _on_worker_ready),
    (signals.worker_shutdown, _on_worker_shutdown),
    (signals.worker_process_shutdown, _on_worker_process_shutdown),
)
