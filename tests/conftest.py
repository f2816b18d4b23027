"""Shared fixtures. Every integration test talks to a real Bolt server.

The whole run also watches for secrets: broker and driver logging is on at
debug level, every record (with its traceback) and every failure report is
scanned for the passwords in play, and the session fails if one shows up.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog

import broker
from broker import default
from broker.testing import child_server

pytest_plugins = ["broker.testing.pytest_plugin"]

#: Secrets some tests put in configs and URIs on purpose.
PLANTED_SECRETS = ("pw-in-uri-7f3a9c", "planted-password-51c0de")

#: A password holding every character that ends a part of a URI. A URI cut
#: at one of them shows only a piece of it, so each piece is watched for too.
HOSTILE_SECRET = "slashA-91e/hashB-27c#queryC-53d?atD-48f@colonE-66a:pctF-12b%pctG-80c"
HOSTILE_PIECES = tuple(re.split(r"[/#?@:%]", HOSTILE_SECRET))


class SecretWatch(logging.Handler):
    """Fails the session if any log line or failure report holds a secret."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.records = 0
        self.leaks: list[str] = []

    @staticmethod
    def secrets() -> set[str]:
        found = {*PLANTED_SECRETS, HOSTILE_SECRET, *HOSTILE_PIECES}
        found.update(s.password for s in list(child_server._live))
        if os.environ.get("NEO4J_PASSWORD"):
            found.add(os.environ["NEO4J_PASSWORD"])
        return {s for s in found if len(s) >= 6}

    def check(self, text: str, where: str) -> None:
        for secret in self.secrets():
            if secret in text:
                self.leaks.append(f"{where}: {text[:300]!r}")

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            text = self.format(record)
        except Exception as exc:
            text = f"unformattable record: {exc!r}"
        self.check(text, f"log {record.name}")


WATCH = SecretWatch()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(WATCH)
    for name in ("broker", "neo4j"):
        logging.getLogger(name).setLevel(logging.DEBUG)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        WATCH.check(str(report.longrepr), f"failure report of {report.nodeid}")


_SERVERS_USED: set[str] = set()


def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> None:
    if fixturedef.argname in {"bolt_server", "restartable_server"}:
        _SERVERS_USED.add(fixturedef.argname)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(WATCH)
    print(f"\nsecret watch: {WATCH.records} log records scanned, {len(WATCH.leaks)} leaks")
    # Any test on a server in this process logs; unit tests alone may not.
    if _SERVERS_USED and WATCH.records == 0:
        print("secret watch saw no log records at all: logging is not wired")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if WATCH.leaks:
        print(f"\nSECRETS LEAKED in {len(WATCH.leaks)} places:")
        for leak in WATCH.leaks[:20]:
            print("  ", leak)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def secret_watch() -> SecretWatch:
    return WATCH


@pytest.fixture(autouse=True)
def _fresh_defaults() -> Iterator[None]:
    """Each test starts with no default broker and structlog unconfigured."""
    yield
    current = default.current()
    if current is not None and not current.closed:
        current.close(timeout=5)
    default.reset()
    structlog.reset_defaults()


@pytest.fixture
async def make_broker(
    bolt_config: broker.Neo4jConnectionConfig,
) -> AsyncIterator[Callable[..., broker.Broker]]:
    """Brokers for the real server, closed (in this test's loop) afterwards."""
    made: list[broker.Broker] = []

    def make(**changes: Any) -> broker.Broker:
        factory = changes.pop("driver_factory", None)
        made.append(broker.Broker(bolt_config.replace(**changes), driver_factory=factory))
        return made[-1]

    yield make
    for b in made:
        await b.aclose(timeout=5)
