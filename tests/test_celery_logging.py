"""Broker events in a real ``celery worker -P threads`` log file: once each, at the worker's level.

The worker's app calls ``broker.log.configure()``, the documented setup;
Celery writes its log to ``--logfile`` and the broker's events must join it
as readable lines carrying the task's id, and nowhere else.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.testing import BoltServer
from examples.celery_config import QUEUE_ENV
from examples.celery_demo import ROOT
from tests.test_celery import celery_client, close_client, new_queue

pytestmark = [pytest.mark.celery, pytest.mark.slow]

TASKS = 6

APP = """
from celery import Celery

import broker
import broker.celery
import broker.log
from examples.celery_config import celery_settings

app = Celery("logs_app")
app.conf.update(celery_settings())
broker.celery.setup(app)
broker.log.configure()  # events join the worker's log, at its --loglevel


@broker.celery.task(app, name="logs.query")
async def query() -> int:
    async with broker.borrow() as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS one")
    return int(records[0]["one"])


@app.task(name="logs.created")
def created() -> int:
    return broker.totals()["created"]
"""

#: ``[2024-01-01 10:00:00,000: INFO/MainProcess] message`` (Celery's worker format).
WORKER_LINE = re.compile(r"^\[[^\]]*: (?P<level>[A-Z]+)/[^\]]*\] (?P<message>.*)$")
#: The first word of a broker event line.
BROKER_EVENT = re.compile(r"^(actor|driver|borrow|return|broker|health_check|celery)(\.\w+)*\b")
DICT_LIKE = re.compile(r"\{\s*'[^']*'\s*:")


def run_worker(server: BoltServer, broker_url: str, level: str) -> tuple[list[str], int, str, str]:
    """Run TASKS tasks on a worker at ``level``; its log file, created count, ids, output."""
    work = Path(tempfile.mkdtemp(prefix="broker-celery-logs-"))
    queue = new_queue()
    try:
        (work / "modules").mkdir()
        (work / "modules" / "logs_app.py").write_text(APP)
        username, password = server.auth
        path = [str(ROOT), str(work / "modules"), os.environ.get("PYTHONPATH")]
        env = {
            **os.environ,
            "NEO4J_URI": server.uri,
            "NEO4J_USERNAME": username,
            "NEO4J_PASSWORD": password,
            "NEO4J_POOL_MIN_SIZE": "0",  # every driver is made for a task
            "NEO4J_POOL_MAX_SIZE": "2",
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": broker_url,
            QUEUE_ENV: queue,
            "PYTHONPATH": os.pathsep.join(filter(None, path)),
        }
        logfile, output = work / "worker.log", work / "output.txt"
        command = [sys.executable, "-m", "celery", "-A", "logs_app", "worker", "-P", "threads"]
        command += ["-c", "2", "--loglevel", level, "--logfile", str(logfile)]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                command, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                while not logfile.exists() or " ready." not in logfile.read_text():
                    assert proc.poll() is None, output.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the worker is not ready after 60 s"
                    time.sleep(0.1)
                client = celery_client(broker_url, queue)
                try:
                    sent = [client.send_task("logs.query") for _ in range(TASKS)]
                    assert [r.get(timeout=60, interval=0.05) for r in sent] == [1] * TASKS
                    created = client.send_task("logs.created").get(timeout=60, interval=0.05)
                    ids = " ".join(r.id for r in sent)
                finally:
                    close_client(client)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        return logfile.read_text().splitlines(), created, ids, output.read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def broker_events(lines: list[str]) -> list[tuple[str, str]]:
    """(level, message) of each broker event line of a worker log."""
    events = []
    for line in lines:
        match = WORKER_LINE.match(line)
        if match and BROKER_EVENT.match(match["message"]):
            events.append((match["level"], match["message"]))
    return events


def field(message: str, name: str) -> str | None:
    match = re.search(rf" {name}=(\S+)", message)
    return match[1] if match else None


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_worker_log_has_each_event_once_at_its_level(
    bolt_server: BoltServer, celery_broker_url: str, level: str
) -> None:
    lines, created, ids, output = run_worker(bolt_server, celery_broker_url, level)
    events = broker_events(lines)
    assert events, "\n".join(lines[-50:])
    assert not [m for _, m in events if DICT_LIKE.search(m)]
    assert not [line for line in lines if "'event':" in line], "an event printed as a dict"
    assert not BROKER_EVENT.search(output), "events went to standard output or error too"
    if level == "INFO":
        assert {lvl for lvl, _ in events} <= {"INFO", "WARNING", "ERROR"}
    names = collections.Counter(message.split()[0] for _, message in events)
    assert names["celery.pools_closed"] == 1

    made = [message for _, message in events if message.startswith("driver.created ")]
    assert 1 <= len(made) == created <= 2
    assert len({field(m, "driver") for m in made}) == len(made), "a driver.created line twice"
    for message in made:  # each made for a task's borrow: it carries the task
        assert field(message, "task_id") in ids.split(), message
        assert field(message, "task_name") == "logs.query", message

    borrows = [m for lvl, m in events if m.startswith("borrow ") and lvl == "DEBUG"]
    returns = [m for lvl, m in events if m.startswith("return ") and lvl == "DEBUG"]
    if level == "DEBUG":
        for kind in (borrows, returns):
            per_task = collections.Counter(field(m, "task_id") for m in kind)
            assert per_task == dict.fromkeys(ids.split(), 1), kind
    else:
        assert borrows == returns == [], "debug events above the worker's level"
