"""``broker.run``: one persistent event loop per thread, so one pool per thread.

``asyncio.run`` per call makes a new loop, and so a new pool, every time.
:func:`run` keeps one loop per calling thread and reuses it, which is how a
thread-pool worker (``celery worker -P threads``) keeps its drivers across
tasks. Every such loop is registered, so :func:`shutdown` can close each one
after its pools have closed their drivers, leaving nothing to the garbage
collector.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import threading
import time
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from broker import inherited
from broker.asyncio_internals import running_loop

__all__ = ["run", "shutdown"]

T = TypeVar("T")

_IDLE, _RUNNING, _CLOSING, _CLOSED = "idle", "running", "closing", "closed"


class _ThreadLoop:
    """One thread's persistent loop and who may run it now."""

    __slots__ = ("closed_event", "loop", "runner", "state", "thread")

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        #: The runner's loop, once it has run (read after a fork without making one).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = weakref.ref(threading.current_thread())
        self.state = _IDLE
        self.closed_event = threading.Event()

    def thread_alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()

    def close_here(self) -> None:
        """Cancel what is left (actors close their drivers), then close the loop."""
        try:
            self.runner.close()
        finally:
            self.state = _CLOSED
            self.closed_event.set()


_lock = threading.Lock()  # guards _loops and every _ThreadLoop.state; never held while a loop runs
_loops: list[_ThreadLoop] = []
_local = threading.local()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the calling thread's persistent event loop; return its result.

    The loop is made on first use and reused by later calls from the same
    thread. Each call runs in a fresh copy of the caller's context variables,
    so nothing bound during one call leaks into the next.
    """
    if running_loop() is not None:
        coro.close()
        raise RuntimeError(
            "broker.run() cannot be called from a thread whose event loop is running "
            f"({threading.current_thread().name}); await the coroutine instead"
        )
    mine = _claim()
    close_now = False
    try:
        if mine.loop is None:
            mine.loop = mine.runner.get_loop()
        return mine.runner.run(coro, context=contextvars.copy_context())
    finally:
        with _lock:
            if mine.state == _CLOSING:
                close_now = True
            else:
                mine.state = _IDLE
        if close_now:
            mine.close_here()


def _claim() -> _ThreadLoop:
    """This thread's loop, marked running; a new one if it was closed meanwhile."""
    orphans: list[_ThreadLoop] = []
    with _lock:
        mine: _ThreadLoop | None = getattr(_local, "loop", None)
        if mine is None or mine.state in (_CLOSING, _CLOSED):
            mine = _ThreadLoop()
            _local.loop = mine
            _loops.append(mine)
            # Loops of threads that have ended can never run again: close them.
            for other in _loops:
                if other.state == _IDLE and not other.thread_alive():
                    other.state = _CLOSING
                    orphans.append(other)
        mine.state = _RUNNING
    for other in orphans:
        _close_and_forget(other)
    return mine


def _close_and_forget(loop: _ThreadLoop) -> None:
    try:
        loop.close_here()
    finally:
        with _lock:
            if loop in _loops:
                _loops.remove(loop)


def shutdown(timeout: float = 10.0) -> None:
    """Close every loop :func:`run` made, after its pools have closed.

    Idle loops are closed here; a loop busy in its thread is closed by that
    thread as soon as its current call returns, and waited for up to
    ``timeout`` seconds. Call it from a thread with no running loop (a
    worker's shutdown hook). Later :func:`run` calls start new loops.
    """
    if running_loop() is not None:
        raise RuntimeError("broker.runner.shutdown() must be called outside a running event loop")
    here: list[_ThreadLoop] = []
    busy: list[_ThreadLoop] = []
    with _lock:
        for loop in _loops:
            if loop.state == _IDLE:
                loop.state = _CLOSING
                here.append(loop)
            elif loop.state == _RUNNING:
                loop.state = _CLOSING
                busy.append(loop)
    for loop in here:
        _close_and_forget(loop)
    deadline = time.monotonic() + timeout
    for loop in busy:
        loop.closed_event.wait(max(0.0, deadline - time.monotonic()))
    with _lock:
        _loops[:] = [loop for loop in _loops if loop.state != _CLOSED]


def _after_fork() -> None:
    global _lock, _loops
    # The parent's loops belong to the parent's threads: forget them unclosed,
    # but keep them (and cut them off) so the child never closes or collects them.
    inherited.keep(_loops)
    inherited.detach(loop.loop for loop in _loops)
    _lock = threading.Lock()
    _loops = []
    _local.__dict__.clear()


@atexit.register
def _close_at_exit() -> None:
    # Without this, loops left open print errors from BaseEventLoop.__del__.
    with contextlib.suppress(Exception):
        shutdown(2.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
