"""Structured events: where they go, what they carry, and what they never carry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import neo4j
import pytest
import structlog

from broker import BorrowTimeout, Broker, log
from broker.testing import BoltServer
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
    """A handler with structlog's ProcessorFormatter and JSONRenderer gets every field."""
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


# -- readable lines, the one-call setup, and the cheap level check ----------------------

#: A Python dict's repr: ``{'event': ...`` (JSON has double quotes).
DICT_LIKE = re.compile(r"\{\s*'[^']*'\s*:")


@pytest.fixture
def broker_logger() -> Iterator[logging.Logger]:
    """The stdlib logger ``broker``, put back as it was after the test."""
    logger = logging.getLogger("broker")
    saved = (logger.level, list(logger.handlers), logger.propagate, logging.getLogger().level)
    yield logger
    for handler in list(logger.handlers):
        if handler not in saved[1]:
            logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[2]
    logging.getLogger().setLevel(saved[3])
    log._reset()


async def test_plain_stdlib_handler_prints_readable_lines(
    make_broker: MakeBroker, broker_logger: logging.Logger
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    broker_logger.addHandler(handler)
    b = make_broker(pool_min_size=0)
    async with b.borrow():
        pass
    lines = stream.getvalue().splitlines()
    assert not [line for line in lines if DICT_LIKE.search(line)], lines
    [borrow] = [line for line in lines if line.startswith("DEBUG broker borrow ")]
    assert re.search(r" wait_ms=[0-9.]+ ", borrow), borrow
    assert " in_use=1 " in borrow and " loop=" in borrow, borrow
    assert any(line.startswith("INFO broker driver.created driver=") for line in lines), lines


def test_unconfigured_failed_creation_prints_no_dict(bolt_server: BoltServer) -> None:
    """A new user's first mistake, with no logging set up: a readable warning on stderr."""
    wrong = "not-the-password-3e1f9a"
    script = textwrap.dedent(
        """
        import asyncio, sys
        import neo4j
        import broker

        async def main():
            config = broker.Neo4jConnectionConfig(
                uri=sys.argv[1], username="root", password=sys.argv[2], pool_min_size=0
            )
            b = broker.Broker(config)
            try:
                await b.borrow(timeout=20)
            except neo4j.exceptions.AuthError:
                print("auth error", flush=True)
            await b.aclose()

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")}
    done = subprocess.run(
        [sys.executable, "-c", script, bolt_server.uri, wrong],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "auth error"
    assert not DICT_LIKE.search(done.stderr), done.stderr
    [line] = [line for line in done.stderr.splitlines() if "driver.create_failed" in line]
    assert line.startswith("driver.create_failed error='AuthError: "), line
    assert wrong not in done.stderr


async def test_configure_writes_json_once_to_its_stream(
    make_broker: MakeBroker, broker_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    log.configure(level="DEBUG", json=True, stream=stream)
    b = make_broker(pool_min_size=0)
    with caplog.at_level(logging.DEBUG):
        async with b.borrow():
            pass
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    borrow = next(line for line in lines if line["event"] == "borrow")
    assert set(borrow) >= COUNTERS | {"wait_ms", "level", "timestamp"}
    assert borrow["level"] == "debug"
    assert [r for r in caplog.records if r.name == "broker"] == [], "not passed on to root"

    log.configure(level=logging.WARNING, stream=stream)  # again: replaces, never stacks
    assert len([h for h in broker_logger.handlers if isinstance(h, logging.StreamHandler)]) == 1
    assert not log.enabled(log.INFO) and log.enabled(log.WARNING)


async def test_configure_with_a_stream_shows_info_whatever_the_root_level(
    make_broker: MakeBroker, broker_logger: logging.Logger
) -> None:
    """A stream named without a level: INFO events are shown though the root is at WARNING."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)  # Python's default
    try:
        stream = io.StringIO()
        log.configure(json=True, stream=stream)
        b = make_broker(pool_min_size=0)
        async with b.borrow():
            pass
        await b.aclose()
    finally:
        root.setLevel(before)
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert "driver.created" in events and "driver.closed" in events, events
    assert "borrow" not in events, "debug events stay hidden unless asked for"
    assert log.enabled(log.INFO) and not log.enabled(log.DEBUG)


async def test_configure_joins_the_root_handlers_at_the_root_level(
    make_broker: MakeBroker, broker_logger: logging.Logger
) -> None:
    """Like a Celery worker: root handlers and level set by the application, events once."""
    stream = io.StringIO()
    root_handler = logging.StreamHandler(stream)
    root_handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(root_handler)
    try:
        log.configure()
        root.setLevel(logging.INFO)
        b = make_broker(pool_min_size=0)
        async with b.borrow():
            pass
        await b.aclose()
    finally:
        root.removeHandler(root_handler)
    lines = [line for line in stream.getvalue().splitlines() if "] broker: " in line]
    created = [line for line in lines if line.startswith("[INFO] broker: driver.created ")]
    assert len(created) == 1, lines
    assert not [line for line in lines if line.startswith("[DEBUG]")], "above the root's level"
    assert not [line for line in lines if DICT_LIKE.search(line)], lines


def test_configure_rejects_an_unknown_level(broker_logger: logging.Logger) -> None:
    before = (broker_logger.level, list(broker_logger.handlers))
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        log.configure(level="LOUD")
    assert (broker_logger.level, list(broker_logger.handlers)) == before


def test_enabled_binds_no_logger_per_check() -> None:
    made: list[tuple[Any, ...]] = []

    def factory(*args: Any) -> Any:
        made.append(args)
        return structlog.ReturnLogger()

    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    assert log.enabled(log.INFO) and not log.enabled(log.DEBUG)
    for _ in range(100):
        log.enabled(log.DEBUG)
    log.emit(log.INFO, "checked", n=1)
    assert len(made) == 1, f"a logger was made {len(made)} times"

    # A later configure() is seen at once, and so is reset_defaults().
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    assert log.enabled(log.DEBUG)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    assert not log.enabled(log.WARNING)
    structlog.reset_defaults()
    stdlib = logging.getLogger("broker")
    saved = stdlib.level
    try:
        stdlib.setLevel(logging.WARNING)
        assert not log.enabled(log.INFO) and log.enabled(log.WARNING)
    finally:
        stdlib.setLevel(saved)


def test_enabled_follows_a_stdlib_bound_logger(broker_logger: logging.Logger) -> None:
    """structlog set up over the stdlib: the stdlib logger's level decides, no extra work."""
    events = []

    def keep(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        events.append(event_dict["event"])
        raise structlog.DropEvent

    structlog.configure(
        processors=[keep],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    broker_logger.setLevel(logging.INFO)
    assert log.enabled(log.INFO) and not log.enabled(log.DEBUG)
    log.emit(log.INFO, "through.app.processors")
    assert events == ["through.app.processors"]
