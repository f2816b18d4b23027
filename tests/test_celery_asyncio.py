"""The asyncio pool when a task ends badly: an exit, its time limits, a revoke with terminate.

Each test runs a real ``celery worker -P custom`` with
:class:`broker.celery_asyncio.AsyncioPool` on the session's Redis and Bolt
server. The worker imports ``aio_tasks`` (below): the example app plus async
tasks that raise ``SystemExit``, outlive their limits, or hold a driver until
they are stopped. What is asserted is what a client sees (results and their
states, how long they took) and what the worker logged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import TimeoutError as ResultTimeout

from broker.testing import BoltServer
from tests.test_celery import LiveWorker, celery_worker

pytestmark = [pytest.mark.celery, pytest.mark.slow]

#: The hard limit of a task that sets none (``app.conf.task_time_limit``).
DEFAULT_HARD = 3

AIO_TASKS = f'''
"""The example app, plus async tasks that end badly."""
import asyncio
import time

from celery.exceptions import SoftTimeLimitExceeded

import broker
import broker.celery
from examples.celery_app import app

app.conf.task_time_limit = {DEFAULT_HARD}


@broker.celery.task(app, name="aio.exit")
async def exit_task(kind):
    async with broker.borrow() as conn:
        await conn.driver.execute_query("RETURN 1")
    await asyncio.sleep(0)
    if kind == "exit":
        raise SystemExit(3)
    raise KeyboardInterrupt


async def hold(seconds, obey_soft):
    """Hold a driver ``seconds``; say when the soft limit was raised in here."""
    started = time.monotonic()
    soft_at = None
    async with broker.borrow() as conn:
        await conn.driver.execute_query("RETURN 1")
        while time.monotonic() - started < seconds:
            try:
                await asyncio.sleep(seconds - (time.monotonic() - started))
            except SoftTimeLimitExceeded:
                soft_at = round(time.monotonic() - started, 2)
                if obey_soft:
                    break
    return {{"soft_at": soft_at, "seconds": round(time.monotonic() - started, 2)}}


@broker.celery.task(app, name="aio.hold")
async def hold_task(seconds, obey_soft=False):
    return await hold(seconds, obey_soft)


@broker.celery.task(app, name="aio.limited", soft_time_limit=1, time_limit=2)
async def limited_task(seconds, obey_soft):
    return await hold(seconds, obey_soft)
'''


@contextlib.contextmanager
def aio_worker(
    server: BoltServer, broker_url: str, concurrency: int, pool_max_size: int
) -> Iterator[LiveWorker]:
    env = {"NEO4J_POOL_MAX_SIZE": str(pool_max_size)}
    with celery_worker(
        server,
        broker_url,
        "asyncio",
        concurrency,
        app="aio_tasks",
        modules={"aio_tasks": AIO_TASKS},
        env=env,
    ) as live:
        yield live


def timed(result: Any, timeout: float) -> tuple[Any, float]:
    started = time.monotonic()
    return result.get(timeout=timeout, interval=0.05), time.monotonic() - started


def in_use(live: LiveWorker) -> int:
    stats = live.call("examples.worker_stats", timeout=10)
    return sum(loop["in_use"] for loop in stats["loops"].values())


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_task_that_exits_fails_alone_and_later_tasks_succeed(
    bolt_server: BoltServer, celery_broker_url: str, kind: str
) -> None:
    with aio_worker(bolt_server, celery_broker_url, concurrency=2, pool_max_size=1) as live:
        before = live.call("examples.probe", "before", timeout=30)
        exiting = live.client.send_task("aio.exit", args=(kind,))
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is checked below
            exiting.get(timeout=15, interval=0.05)
        assert not isinstance(raised.value, ResultTimeout), "the task never ended"
        # It failed, alone, naming what it raised.
        assert exiting.state == "FAILURE"
        assert type(raised.value).__name__ == "TaskExited"
        assert ("SystemExit" if kind == "exit" else "KeyboardInterrupt") in str(raised.value)
        # The shared loop still runs: every later task is served, by the one driver.
        after = [live.call("examples.probe", f"after-{n}", timeout=15) for n in range(3)]
        assert in_use(live) == 0
        assert live.worker.proc.poll() is None
        run = live.stop()
    assert before["ok"] and all(probe["ok"] for probe in after)
    assert {probe["loop"] for probe in after} == {before["loop"]}
    assert "the shared loop is not running" not in run.output
    assert run.exit_code == 0
