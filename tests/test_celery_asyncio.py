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
from celery.exceptions import TaskRevokedError, TimeLimitExceeded
from celery.exceptions import TimeoutError as ResultTimeout

from broker.testing import BoltServer
from tests.test_celery import LiveWorker, celery_worker
from tests.test_celery_fleet import read_events

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.hardening]

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
    while time.monotonic() - started < seconds:
        try:
            async with broker.borrow() as conn:
                await conn.driver.execute_query("RETURN 1")
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


def test_soft_and_hard_time_limits_end_the_coroutine(
    bolt_server: BoltServer, celery_broker_url: str
) -> None:
    with aio_worker(bolt_server, celery_broker_url, concurrency=4, pool_max_size=4) as live:
        send = live.client.send_task
        obeys = send("aio.limited", args=(20, True))  # soft 1 s, hard 2 s
        ignores = send("aio.limited", args=(20, False))
        by_default = send("aio.hold", args=(20, False))  # app.conf.task_time_limit
        by_message = send("aio.hold", args=(20, False), time_limit=1.5, soft_time_limit=0.5)
        value = obeys.get(timeout=10, interval=0.05)
        for ended in (ignores, by_default, by_message):
            with pytest.raises(TimeLimitExceeded):
                ended.get(timeout=10, interval=0.05)
        # Each driver came back to the pool.
        assert in_use(live) == 0
        run = live.stop()
    # The soft limit was raised inside the coroutine, which returned its result.
    assert value["soft_at"] is not None and 0.9 <= value["soft_at"] < 1.8, value
    assert value["seconds"] < 2, value
    assert ignores.state == by_default.state == by_message.state == "FAILURE"
    # Celery's own warning and error, each with the limit that applied.
    soft = (("1", "aio.limited", obeys), ("1", "aio.limited", ignores))
    for limit, name, task in (*soft, ("0.5", "aio.hold", by_message)):
        assert f"Soft time limit ({limit}s) exceeded for {name}[{task.id}]" in run.output
    hard = (("2", "aio.limited", ignores), (str(DEFAULT_HARD), "aio.hold", by_default))
    for limit, name, task in (*hard, ("1.5", "aio.hold", by_message)):
        assert f"Hard time limit ({limit}s) exceeded for {name}[{task.id}]" in run.output
    assert f"Hard time limit (2s) exceeded for aio.limited[{obeys.id}]" not in run.output
    returned = {e.get("task_id") for e in run.events if e.get("event") == "return"}
    assert {obeys.id, ignores.id, by_default.id, by_message.id} <= returned
    assert run.exit_code == 0


def test_revoke_with_terminate_cancels_the_coroutine_and_frees_its_driver(
    bolt_server: BoltServer, celery_broker_url: str
) -> None:
    with aio_worker(bolt_server, celery_broker_url, concurrency=2, pool_max_size=1) as live:
        # Longer than any limit: only the revoke can end it early.
        long = live.client.send_task("aio.hold", args=(60, False), time_limit=120)
        deadline = time.monotonic() + 30
        while not any(
            e.get("event") == "borrow" and e.get("task_id") == long.id
            for e in read_events(live.work / "broker.jsonl")
        ):
            assert time.monotonic() < deadline, "the long task never borrowed"
            time.sleep(0.05)
        live.client.control.revoke(long.id, terminate=True)
        with pytest.raises(TaskRevokedError):
            long.get(timeout=10, interval=0.05)
        # The one driver came back: the next task is served at once.
        probe, seconds = timed(live.client.send_task("examples.probe", args=("next",)), 10)
        assert probe["ok"] and seconds < 5
        assert in_use(live) == 0
        run = live.stop()
    assert long.state == "REVOKED"
    assert "does not implement kill_job" not in run.output
    returned = [e for e in run.events if e.get("event") == "return" and e.get("task_id") == long.id]
    assert len(returned) == 1
    assert run.exit_code == 0
