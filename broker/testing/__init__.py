"""Real Bolt servers and pytest fixtures for testing code that uses broker.

The server classes are imported on first use, so that
``python -m broker.testing.server`` runs that module fresh.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.testing.neo4j_server import Neo4jServer
    from broker.testing.selection import server_kind
    from broker.testing.server import (
        BoltServer,
        EmbeddedServer,
        ExternalServer,
        ServerError,
        server_from_env,
    )

_HOMES = {
    "BoltServer": "server",
    "EmbeddedServer": "server",
    "ExternalServer": "server",
    "Neo4jServer": "neo4j_server",
    "ServerError": "server",
    "server_from_env": "server",
    "server_kind": "selection",
}
__all__ = [
    "BoltServer",
    "EmbeddedServer",
    "ExternalServer",
    "Neo4jServer",
    "ServerError",
    "server_from_env",
    "server_kind",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"broker.testing.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
