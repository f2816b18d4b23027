"""TLS end to end: the broker borrows and queries through a TLS front on the real server.

Every scheme a deployment may use (``bolt+s``, ``bolt+ssc``, ``neo4j+s``,
``neo4j+ssc``, and ``bolt``/``neo4j`` with a CA in ``driver_options``), and a
certificate the driver must not trust, which must fail fast and say why.
The front's added latency, and that it leaves nothing behind, too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import neo4j
import pytest
import trustme

from broker import BorrowTimeout, Broker, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.faults import FaultProxy
from broker.testing.sockets import open_connections
from broker.testing.tls import TlsFront


@pytest.fixture(scope="module")
def front(bolt_server: BoltServer) -> Iterator[TlsFront]:
    if not bolt_server.uri.startswith("bolt://"):
        pytest.skip("the TLS front goes in front of a plain bolt:// server")
    with TlsFront.for_uri(bolt_server.uri) as tls:
        yield tls


def config_for(
    front: TlsFront, bolt_server: BoltServer, scheme: str, **changes: Any
) -> Neo4jConnectionConfig:
    username, password = bolt_server.auth
    return Neo4jConnectionConfig(
        uri=front.uri(scheme),
        username=username,
        password=password,
        database=bolt_server.default_database,
        driver_options=front.driver_options(scheme),
        pool_min_size=0,
        pool_max_size=2,
        borrow_timeout=20.0,
    ).replace(**changes)


async def borrow_and_query(b: Broker) -> list[int]:
    """Two borrows on one loop, a query each: the second reuses the first's driver."""
    got = []
    for _ in range(2):
        async with b.borrow() as conn:
            records, _, _ = await conn.driver.execute_query("RETURN 1 AS one")
            got.append(records[0]["one"])
    return got


@pytest.mark.parametrize("scheme", ["bolt+s", "neo4j+s", "bolt+ssc", "neo4j+ssc", "bolt", "neo4j"])
async def test_each_tls_scheme_borrows_and_queries(
    front: TlsFront, bolt_server: BoltServer, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if scheme.endswith("+s"):
        # The +s schemes trust the system's CAs; a private CA joins them this way.
        for name, value in front.trusting_env().items():
            monkeypatch.setenv(name, value)
    accepted = front.accepted
    b = Broker(config_for(front, bolt_server, scheme))
    try:
        assert await borrow_and_query(b) == [1, 1]
        assert b.totals()["created"] == 1
    finally:
        await b.aclose()
    assert front.accepted > accepted  # the queries did go through the front


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error, its causes and contexts, and the members of exception groups."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("scheme", ["bolt+s", "neo4j+s", "bolt", "neo4j"])
async def test_a_certificate_from_another_ca_fails_at_once_and_says_so(
    front: TlsFront,
    bolt_server: BoltServer,
    scheme: str,
    other_ca: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = front.driver_options(scheme)
    if scheme.endswith("+s"):
        monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    else:
        options["trusted_certificates"] = neo4j.TrustCustomCAs(str(other_ca))
    # A borrow timeout far longer than the test: only the creation error can end it.
    b = Broker(config_for(front, bolt_server, scheme, driver_options=options, borrow_timeout=600))
    try:
        with pytest.raises(neo4j.exceptions.ServiceUnavailable) as caught:
            await asyncio.wait_for(b.borrow(), 60)
    finally:
        await b.aclose()
    assert not isinstance(caught.value, BorrowTimeout | TimeoutError)
    # The driver names the cause in the message (bolt) or in the chain (routing).
    chain = list(causes(caught.value))
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or any(
        "SSLCertVerificationError" in str(e) for e in chain
    ), chain
    stats = b.totals()
    assert stats["created"] == 0
    assert stats["connect_errors"] >= 1


async def test_the_front_leaves_nothing_behind(bolt_server: BoltServer) -> None:
    if not bolt_server.uri.startswith("bolt://"):
        pytest.skip("the TLS front goes in front of a plain bolt:// server")
    for in_process in (True, False):
        tls = TlsFront.for_uri(bolt_server.uri, in_process=in_process).start()
        folder, port, pid = tls.ca_file.parent, tls.port, tls.pid
        assert (pid is None) == in_process
        config = Neo4jConnectionConfig(
            uri=tls.uri("bolt+ssc"),
            username=bolt_server.auth[0],
            password=bolt_server.auth[1],
            pool_min_size=0,
        )
        b = Broker(config)
        try:
            assert await borrow_and_query(b) == [1, 1]
            assert open_connections(port) == 1
        finally:
            await b.aclose()
            tls.stop()
        assert not folder.exists()
        if pid is not None:  # the front's process has ended and was reaped
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert open_connections(port) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- added latency -----------------------------------------------------------------


class Echo:
    """A plain TCP echo server on a thread: the latency tests need no Bolt."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            # A stopping proxy resets its links: that ends the echo too.
            with conn, contextlib.suppress(ConnectionResetError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    try:
        yield server
    finally:
        server.close()


def test_latency_delays_each_way_and_keeps_order(echo: Echo) -> None:
    latency = 0.05
    with (
        FaultProxy("127.0.0.1", echo.port, latency=latency) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client,
    ):
        started = time.monotonic()
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        # A lower bound only: a slow machine makes it longer, never shorter.
        assert time.monotonic() - started >= 2 * latency
        # Many writes in a row arrive whole and in order.
        payload = os.urandom(1 << 20)
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = client.recv(65536)
            assert chunk
            got += chunk
        sender.join()
        assert bytes(got) == payload


def test_latency_must_be_seconds() -> None:
    for bad in (-0.001, float("nan"), float("inf"), "1ms", True):
        with pytest.raises(ValueError, match="latency"):
            FaultProxy("127.0.0.1", 9, latency=bad)  # type: ignore[arg-type]
