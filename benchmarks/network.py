"""The networks a benchmark runs over: the local server as it is, or TLS plus latency.

Production reaches Neo4j over TLS and a network hop (Aura takes ``neo4j+s``
only). The TLS network puts a :class:`~broker.testing.tls.TlsFront` in front
of the server, in a process of its own so that its TLS and forwarding work is
not counted against the measured process, with a fixed latency added to every
chunk each way. Drivers connect the way ``neo4j+s://`` does (routing, TLS,
the certificate verified), trusting the front's CA through ``driver_options``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker import Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.tls import TlsFront

#: Added latency each way: a LAN or cloud-region hop.
LATENCY = 0.001
#: The scheme drivers use through the front; ``neo4j`` with the front's
#: ``driver_options`` is ``neo4j+s`` trusting a private CA.
SCHEME = "neo4j"


@dataclass
class Network:
    """How drivers reach the server: a URI and the driver options it needs."""

    name: str
    uri: str
    auth: tuple[str, str]
    driver_options: dict[str, Any] = field(default_factory=dict)

    def config(self, **changes: Any) -> Neo4jConnectionConfig:
        username, password = self.auth
        config = Neo4jConnectionConfig(
            uri=self.uri, username=username, password=password, driver_options=self.driver_options
        )
        return config.replace(**changes)


def local(server: BoltServer) -> Network:
    return Network("local", server.uri, server.auth)


def can_front(server: BoltServer) -> bool:
    """Whether a TLS front can go in front of ``server`` (a plain ``bolt://`` one).

    A server given by ``NEO4J_URI`` with another scheme is measured as it is.
    """
    return server.uri.startswith("bolt://")


@contextlib.contextmanager
def tls(server: BoltServer, latency: float = LATENCY) -> Iterator[Network]:
    """TLS and ``latency`` seconds each way, for as long as the block runs."""
    if not can_front(server):
        raise RuntimeError(f"the TLS front needs a plain bolt:// server, not {server.uri}")
    with TlsFront.for_uri(server.uri, latency=latency, in_process=False) as front:
        name = f"TLS +{latency * 1000:g} ms"
        yield Network(name, front.uri(SCHEME), server.auth, front.driver_options(SCHEME))
