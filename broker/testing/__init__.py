"""A real Bolt server and pytest fixtures for testing code that uses broker."""

from broker.testing.server import (
    BoltServer,
    EmbeddedServer,
    ExternalServer,
    ServerError,
    server_from_env,
)

__all__ = ["BoltServer", "EmbeddedServer", "ExternalServer", "ServerError", "server_from_env"]
