"""Which test server to run: ArcadeDB by default, Neo4j on request.

``BROKER_TEST_SERVER`` chooses: ``arcadedb`` (the default, which needs no
Java install) or ``neo4j`` (Neo4j Community, built with Maven on first use;
``BROKER_TEST_NEO4J_VERSION`` picks its version, ``JAVA_HOME`` its Java).
``NEO4J_URI`` names a server already running and wins over both.
"""

from __future__ import annotations

import os
from typing import Literal

from broker.testing.neo4j_server import Neo4jServer
from broker.testing.server import EmbeddedServer

__all__ = [
    "KINDS",
    "LocalServer",
    "ServerKind",
    "bench_server",
    "local_kind",
    "new_local_server",
    "server_kind",
]

ServerKind = Literal["arcadedb", "neo4j", "external"]
#: A server this process starts, kills and restarts.
LocalServer = EmbeddedServer | Neo4jServer
KINDS = ("arcadedb", "neo4j")


def local_kind(kind: str | None = None) -> Literal["arcadedb", "neo4j"]:
    """The kind of server to start: ``kind``, else ``BROKER_TEST_SERVER``, else ArcadeDB."""
    chosen = (kind or os.environ.get("BROKER_TEST_SERVER") or "arcadedb").strip().lower()
    if chosen == "arcadedb":
        return "arcadedb"
    if chosen == "neo4j":
        return "neo4j"
    raise ValueError(f"BROKER_TEST_SERVER={chosen!r} is not one of {', '.join(KINDS)}")


def server_kind() -> ServerKind:
    """What the tests talk to: an external server (``NEO4J_URI``), or which local one."""
    if os.environ.get("NEO4J_URI"):
        return "external"
    return local_kind()


def new_local_server(kind: str | None = None) -> LocalServer:
    """A server of the chosen kind, not started yet."""
    if local_kind(kind) == "neo4j":
        return Neo4jServer()
    return EmbeddedServer()


def bench_server(kind: str | None = None) -> LocalServer:
    """A server for the benchmarks: ArcadeDB with a larger heap, or Neo4j."""
    if local_kind(kind) == "neo4j":
        return Neo4jServer()
    return EmbeddedServer(heap="1g")
