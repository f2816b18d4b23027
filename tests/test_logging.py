"""Structured events: where they go, what they carry, and what they never carry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import neo4j
import pytest
import structlog

from broker import BorrowTimeout, Broker
from tests.conftest import SecretWatch

MakeBroker = Callable[..., Broker]
COUNTERS = {"loop", "thread", "available", "in_use", "creating", "waiting", "total"}


def capture_structlog() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            keep,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    return events


async def test_unconfigured_structlog_prints_nothing_to_stdout(
    make_broker: MakeBroker, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert not structlog.is_configured()
    b = make_broker(pool_min_size=0)
    with caplog.at_level(logging.DEBUG, logger="broker"):
        async with b.borrow():
            pass
    out, _ = capsys.readouterr()
    assert out == "", "the library must not print events to stdout"
    events = [r.msg["event"] for r in caplog.records if r.name == "broker"]  # type: ignore[index]
    assert "borrow" in events and "return" in events and "driver.created" in events


async def test_stdlib_events_render_as_json(make_broker: MakeBroker) -> None:
    """The documented recipe: ProcessorFormatter + JSONRenderer on the 'broker' logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer())
    )
    logger = logging.getLogger("broker")
    logger.addHandler(handler)
    try:
        b = make_broker(pool_min_size=0)
        async with b.borrow():
            pass
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    borrow = next(line for line in lines if line["event"] == "borrow")
    assert set(borrow) >= COUNTERS and "wait_ms" in borrow


async def test_events_carry_loop_thread_and_counters(make_broker: MakeBroker) -> None:
    events = capture_structlog()
    b = make_broker(pool_max_size=1, pool_min_size=0)
    conn = await b.borrow()
    with pytest.raises(BorrowTimeout):
        await b.borrow(timeout=0.05)
    await conn.release()
    await b.aclose()
    names = [e["event"] for e in events]
    for expected in (
        "actor.started",
        "driver.created",
        "borrow",
        "borrow.timeout",
        "return",
        "broker.closing",
        "actor.closing",
        "driver.closed",
        "actor.stopped",
    ):
        assert expected in names, (expected, names)
    for event in events:
        if event["event"] != "broker.closing":
            assert set(event) >= COUNTERS, event
    levels = {e["event"]: e["level"] for e in events}
    assert levels["borrow"] == "debug" and levels["return"] == "debug"
    assert levels["borrow.timeout"] == "warning"
    borrow = next(e for e in events if e["event"] == "borrow")
    returned = next(e for e in events if e["event"] == "return")
    assert borrow["wait_ms"] >= 0 and returned["hold_ms"] >= 0
    closed = next(e for e in events if e["event"] == "driver.closed")
    assert closed["reason"] == "broker closed"


async def test_context_of_the_first_borrower_does_not_stick_to_the_actor(
    make_broker: MakeBroker,
) -> None:
    events = capture_structlog()
    b = make_broker(pool_min_size=0)

    async def task(task_id: str) -> None:
        structlog.contextvars.bind_contextvars(task_id=task_id)
        async with b.borrow():
            pass

    await asyncio.create_task(task("first"))
    await asyncio.create_task(task("second"))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_name.setdefault(e["event"], []).append(e)
    assert "task_id" not in by_name["actor.started"][0]
    assert [e["task_id"] for e in by_name["borrow"]] == ["first", "second"]
    assert by_name["driver.created"][0]["task_id"] == "first", "created for the first borrower"


async def test_failure_events_name_the_reason_without_secrets(
    make_broker: MakeBroker, secret_watch: SecretWatch
) -> None:
    events = capture_structlog()
    planted = "planted-password-51c0de"
    b = make_broker(password=planted, pool_min_size=0)
    with pytest.raises(neo4j.exceptions.AuthError) as caught:
        await b.borrow(timeout=20)
    assert planted not in str(caught.value)
    failed = next(e for e in events if e["event"] == "driver.create_failed")
    assert "AuthError" in failed["error"]
    assert planted not in json.dumps(events, default=str)
    assert planted not in repr(b)
    assert planted in secret_watch.secrets()
