"""Logins against a real Neo4j: one stale password must not lock a user out, and rotation works.

Neo4j locks a user for a few seconds after 3 failed logins in a row, and
while locked it refuses that user everywhere, the right password too. Each
test here uses a user of its own, made for it and dropped afterwards, so a
lock never reaches another test.

Skipped unless the suite runs against Neo4j (``make test-neo4j``).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator

import neo4j
import neo4j.exceptions
import pytest

import broker
from broker import Broker, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.neo4j_server import quiet_driver_log
from tests.helpers import as_neo4j, neo4j_only

pytestmark = neo4j_only


@pytest.fixture
def user(bolt_server: BoltServer) -> Iterator[tuple[str, str]]:
    """A user of the test's own, with a fresh password; dropped afterwards."""
    name = "u" + secrets.token_hex(6)
    password = "pw-" + secrets.token_urlsafe(12)
    server = as_neo4j(bolt_server)
    server.create_user(name, password)
    try:
        yield name, password
    finally:
        server.drop_user(name)


def _login(server: BoltServer, name: str, password: str) -> bool:
    """A fresh driver's login, as a correctly configured client makes it."""
    try:
        with neo4j.GraphDatabase.driver(server.uri, auth=(name, password)) as driver:
            driver.verify_connectivity()
        return True
    except neo4j.exceptions.Neo4jError:
        return False


def test_a_stale_worker_does_not_lock_out_a_correct_client(
    bolt_server: BoltServer, bolt_config: Neo4jConnectionConfig, user: tuple[str, str]
) -> None:
    """A worker with a stale password runs a task every 0.25 s on 2 threads,
    asyncio.run per task; a correct client logs in every 0.5 s beside it."""
    name, password = user
    stale = Broker(
        bolt_config.replace(username=name, password="stale-" + password, pool_min_size=0)
    )
    stop = threading.Event()
    task_times: list[float] = []
    task_errors: list[str] = []

    async def task() -> None:
        async with stale.borrow(timeout=2) as conn:
            await conn.driver.execute_query("RETURN 1")

    def worker() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                asyncio.run(task())
            except neo4j.exceptions.AuthError as exc:  # AuthBackoff and UserLocked too
                task_errors.append(type(exc).__name__)
            except Exception as exc:  # a task must fail with an auth error, nothing else
                task_errors.append(f"unexpected {exc!r}")
            task_times.append(time.monotonic() - began)
            stop.wait(0.25)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    logins: list[bool] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            logins.append(_login(bolt_server, name, password))
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        stale.close()
    assert sum(logins) / len(logins) >= 0.95, f"{logins.count(False)} of {len(logins)} refused"
    assert task_errors and all(not e.startswith("unexpected") for e in task_errors), task_errors
    assert max(task_times) < 2.5, "every stale task failed within its borrow timeout"


def test_a_rotated_password_fails_no_task_and_locks_nothing(
    bolt_server: BoltServer, bolt_config: Neo4jConnectionConfig, user: tuple[str, str]
) -> None:
    """ALTER CURRENT USER SET PASSWORD, then the new secret for new drivers and
    drain(): tasks on persistent loops never fail, and the user is never locked."""
    name, password = user
    secret = {"password": password}
    b = Broker(
        bolt_config.replace(
            username=name, pool_min_size=1, pool_max_size=2, credentials=lambda: secret["password"]
        )
    )
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    async def task() -> int:
        async with b.borrow(timeout=10) as conn:
            records, _, _ = await conn.driver.execute_query("RETURN 1 AS v")
            return int(records[0]["v"])

    def worker() -> None:
        while not stop.is_set():
            try:
                done.append(broker.run(task()))
            except BaseException as exc:
                errors.append(exc)
            stop.wait(0.05)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        new = "pw-" + secrets.token_urlsafe(12)

        async def rotate() -> None:
            async with b.borrow(timeout=10) as conn:
                await conn.driver.execute_query(
                    "ALTER CURRENT USER SET PASSWORD FROM $old TO $new",
                    old=password,
                    new=new,
                    database_="system",
                )

        with quiet_driver_log():  # the driver's debug log shows a query's parameters
            asyncio.run(rotate())
        secret["password"] = new
        b.drain()
        time.sleep(2.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        broker.runner.shutdown(10)
        b.close()
    assert errors == [] and len(done) > 20
    assert _login(bolt_server, name, new), "not locked: the new password logs in"
