"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker import Neo4jConnectionConfig
from broker.testing import BoltServer, Neo4jServer, server_kind

#: For ``pytestmark``: a slow test of what only a real Neo4j shows, skipped on other servers.
neo4j_only = [
    pytest.mark.slow,
    pytest.mark.skipif(
        server_kind() != "neo4j",
        reason="Neo4j-only behaviour: run with BROKER_TEST_SERVER=neo4j (make test-neo4j)",
    ),
]


def as_neo4j(server: BoltServer) -> Neo4jServer:
    """The suite's server as the Neo4j it is in a ``neo4j_only`` test."""
    assert isinstance(server, Neo4jServer), f"a Neo4j-only test got {server!r}"
    return server


def bolt_port(server: BoltServer) -> int:
    """The port of the server's Bolt URI."""
    return int(server.uri.rsplit(":", 1)[1])


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait (letting the loop run) until ``check()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        await asyncio.sleep(0.01)


def eventually_sync(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """:func:`eventually` for code outside a loop."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        time.sleep(0.01)


#: What a clean end prints nowhere.
TROUBLE = ("Task was destroyed", "ResourceWarning", "unclosed", "Exception ignored", "Traceback")


def strict_env(config: Neo4jConnectionConfig) -> dict[str, str]:
    """The environment of a child that talks to the test server, in asyncio debug mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")}
    env.update(
        NEO4J_URI=config.uri,
        NEO4J_USERNAME=config.username,
        NEO4J_PASSWORD=config.password,
        PYTHONASYNCIODEBUG="1",
    )
    if config.database:
        env["NEO4J_DATABASE"] = config.database
    return env


def run_strict(
    script: str,
    config: Neo4jConnectionConfig,
    *args: str,
    strict: bool = True,
    timeout: float = 240,
) -> dict[str, Any]:
    """Run ``script`` in a child interpreter; check its stderr; return its last JSON line.

    Strict: asyncio's debug mode on, ResourceWarning an error, and nothing on
    stderr that says a task was left pending or a resource unclosed. The
    child is killed after ``timeout`` seconds.
    """
    env = strict_env(config)
    warnings = ["-W", "error::ResourceWarning"]
    if not strict:
        del env["PYTHONASYNCIODEBUG"]
        warnings = []
    done = subprocess.run(
        [sys.executable, *warnings, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    trouble = [line for line in done.stderr.splitlines() if any(t in line for t in TROUBLE)]
    assert done.returncode == 0 and (trouble == [] or not strict), done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
