"""A link cut while a driver connects: the broker's own timeouts must leave no socket.

Each test runs twice: behind a kernel-level partition (a network namespace
whose veth drops every packet, where the machine allows it) and behind the
fault proxy, which leaves new TCP handshakes unanswered the same way.
Sockets are counted after the heal, the pool closed and the loop ended,
with the collector off: a socket only the collector would close is a leak.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import neo4j.exceptions
import pytest

from broker import Broker, Neo4jConnectionConfig
from broker.testing.faults import FaultProxy
from broker.testing.partition import Partition
from broker.testing.server import BoltServer
from broker.testing.sockets import open_connections
from tests.helpers import bolt_port

pytestmark = pytest.mark.hardening


@dataclass
class Link:
    """Where to connect, and how to cut and heal the way there."""

    uri: str
    port: int
    cut: Callable[[], None]
    heal: Callable[[], None]


@pytest.fixture(params=["netns", "proxy"])
def link(request: pytest.FixtureRequest, bolt_server: BoltServer) -> Iterator[Link]:
    target = ("127.0.0.1", bolt_port(bolt_server))
    if request.param == "proxy":
        with FaultProxy(*target) as proxy:
            yield Link(proxy.uri, proxy.port, proxy.stall_connects, proxy.pass_through)
        return
    reason = Partition.unavailable()
    if reason is not None:
        pytest.skip(f"no kernel-level partition here: {reason}")
    with Partition(*target) as partition:
        yield Link(partition.uri, partition.port, partition.cut, partition.heal)


def sockets_left(scenario: Callable[[], Coroutine[Any, Any, None]], port: int) -> int:
    """Run ``scenario`` in a loop of its own; the sockets to ``port`` left once it ended."""
    gc.disable()  # what only the collector would close must show up, on every run
    try:
        asyncio.run(scenario())
        return open_connections(port)
    finally:
        gc.enable()
        gc.collect()  # leaves nothing behind, even when the test fails


async def query(b: Broker) -> int:
    async with b.borrow(timeout=20) as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS v")
        return int(records[0]["v"])


def test_a_creation_cut_short_by_our_timeout_leaves_no_socket(
    link: Link, bolt_config: Neo4jConnectionConfig
) -> None:
    """``connection_timeout`` equal to ``connection_acquisition_timeout`` (as by
    default): our limit ends first, while the driver still connects."""
    config = bolt_config.replace(
        uri=link.uri,
        pool_min_size=0,
        pool_max_size=1,
        connection_timeout=1.0,
        connection_acquisition_timeout=1.0,
    )

    async def scenario() -> None:
        b = Broker(config)
        link.cut()
        try:
            for _ in range(2):
                with pytest.raises(neo4j.exceptions.ServiceUnavailable, match="within 1 s"):
                    async with b.borrow(timeout=10):
                        pass
        finally:
            link.heal()
        await b.aclose(timeout=10)
        # The link works again (a first login may take more than 1 s on a busy
        # server, and the kernel may still hold the peer unreachable a moment).
        healed = Broker(
            config.replace(connection_timeout=10.0, connection_acquisition_timeout=10.0)
        )
        for _ in range(20):
            try:
                assert await query(healed) == 1
                break
            except neo4j.exceptions.ServiceUnavailable:
                await asyncio.sleep(0.5)
        else:
            raise AssertionError("the healed link never carried a query")
        await healed.aclose(timeout=10)

    assert sockets_left(scenario, link.port) == 0


def test_a_check_cut_short_by_our_timeout_leaves_no_socket(
    link: Link, bolt_config: Neo4jConnectionConfig
) -> None:
    """``health_check_timeout`` below ``connection_timeout`` (as by default): a
    check that must connect ends on our limit while the driver still connects."""
    config = bolt_config.replace(
        uri=link.uri,
        pool_min_size=0,
        pool_max_size=2,
        verify_on_create=False,  # a borrow's driver is made without a connection
        connection_timeout=2.0,
        health_check_timeout=0.5,
    )

    async def scenario() -> None:
        b = Broker(config)
        async with b.borrow(timeout=10), b.borrow(timeout=10):
            pass  # two idle drivers, neither connected: their checks must connect
        link.cut()
        try:
            assert await b.check() == 2  # both failed their check and were discarded
        finally:
            link.heal()
        assert await query(b) == 1
        await b.aclose(timeout=10)

    assert sockets_left(scenario, link.port) == 0
