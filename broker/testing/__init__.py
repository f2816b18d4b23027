"""A real Bolt server and pytest fixtures for testing code that uses broker.

The server classes are imported on first use, so that
``python -m broker.testing.server`` runs that module fresh.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.testing.server import (
        BoltServer,
        EmbeddedServer,
        ExternalServer,
        ServerError,
        server_from_env,
    )

__all__ = ["BoltServer", "EmbeddedServer", "ExternalServer", "ServerError", "server_from_env"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("broker.testing.server"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
