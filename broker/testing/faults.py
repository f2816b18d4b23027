"""A TCP proxy that misbehaves on demand, for fault tests against a real server.

It runs in a thread of its own with its own event loop, so the loops under
test never share anything with it. Put it between a driver and the server
(``proxy.uri``) and switch it, from any thread, between:

- :meth:`pass_through`: forward bytes both ways (the default);
- :meth:`reset_all`: reset every open connection (TCP RST);
- :meth:`blackhole`: keep connections open but forward nothing;
- :meth:`delay_handshake`: hold each new connection's first bytes for a while;
- :meth:`refuse`: stop listening, so new connections are refused;
- :meth:`stall_connects`: leave new connections unanswered in the TCP
  handshake, as behind a cut link (open ones go on).

Two settings fixed at construction make it stand in for a real network hop:
``latency`` delays every chunk by that many seconds in each direction (order
kept, throughput not limited: reading goes on while earlier chunks wait), and
``tls`` makes it a TLS-terminating listener (a server-side ``SSLContext``) in
front of a plain Bolt server. ``python -m broker.testing.faults`` runs one in
a process of its own, so that its work does not share the caller's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Self, TypeVar

from broker.testing.service import Service

__all__ = ["FaultProxy"]

T = TypeVar("T")
_CHUNK = 65536
# Chunks read but not yet due, per direction, before reading waits: a bound on
# memory, far above what a 1 ms delay holds at loopback speed.
_IN_FLIGHT = 256


class _Link:
    """One client connection and its upstream twin."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client_reader, self.client_writer = client
        self.upstream_reader, self.upstream_writer = upstream

    def reset(self) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy(Service):
    """A loopback TCP proxy to ``target_host:target_port`` with switchable faults.

    ``latency``: seconds added to every chunk, each way. ``tls``: terminate
    TLS with this server context; the upstream connection stays plain.
    ``host``: the address to listen on.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        latency: float = 0.0,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if isinstance(latency, bool) or not isinstance(latency, int | float):
            raise ValueError(f"latency must be a number of seconds, got {type(latency).__name__}")
        if math.isnan(latency) or math.isinf(latency) or latency < 0:
            raise ValueError(f"latency must be zero or more seconds, got {latency!r}")
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise ValueError(f"tls must be an ssl.SSLContext or None, got {type(tls).__name__}")
        self.target = (target_host, target_port)
        self.latency = float(latency)
        self.tls = tls
        self.host = host
        self.port = 0
        # A listener that answers no handshake (stall_connects), and the one
        # connection that fills its queue.
        self._stall: list[socket.socket] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._handshake_delay = 0.0
        self.accepted = 0

    # -- life ----------------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._flow(True))
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def uri(self) -> str:
        scheme = "bolt" if self.tls is None else "bolt+s"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def open_links(self) -> int:
        return len(self._links)

    # -- faults --------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward everything, listen for new connections, no delay."""
        self._handshake_delay = 0.0
        self._call(self._flow(True))
        self._call(self._listen())

    def reset_all(self) -> int:
        """Reset every open connection; return how many were reset."""
        return self._call(self._reset())

    def blackhole(self) -> None:
        """Accept and keep connections, forward nothing, answer nothing."""
        self._call(self._flow(False))

    def delay_handshake(self, seconds: float) -> None:
        """Hold each new connection's first bytes for ``seconds``."""
        self._handshake_delay = seconds

    def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones go on."""
        self._call(self._unlisten())

    def stall_connects(self) -> None:
        """Answer no new TCP handshake, as a cut link would; open ones go on.

        The port is held by a listener whose queue is full and never read:
        the kernel drops each new SYN, and the client retries until its own
        timeout, or until :meth:`pass_through` listens again.
        """
        self._call(self._stall_listen())

    # -- inside the proxy's loop -----------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _flow(self, on: bool) -> None:
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._unstall()
        self._server = await asyncio.start_server(self._accept, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        self._unstall()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _stall_listen(self) -> None:
        await self._unlisten()
        listener = socket.socket()
        self._stall.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(0)  # a queue of one connection
        self._stall.append(socket.create_connection((self.host, self.port), timeout=5))

    def _unstall(self) -> None:
        for sock in self._stall:
            sock.close()
        self._stall.clear()

    async def _reset(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._reset()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link((reader, writer), upstream)
        self._links.add(link)
        first = [self._handshake_delay]
        pump = self._pump if self.latency == 0 else self._pump_late
        pumps = [
            asyncio.create_task(pump(link, reader, upstream[1], first)),
            asyncio.create_task(pump(link, upstream[0], writer, [0.0])),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._pumps.difference_update(pumps)
            self._links.discard(link)
            for w in (writer, upstream[1]):
                w.transport.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: list[float],
    ) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                _end_stream(writer)
                return
            if delay[0] > 0:
                await asyncio.sleep(delay[0])
                delay[0] = 0.0
            if not await self._forward(link, writer, data):
                return

    async def _forward(self, link: _Link, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Send ``data`` on once traffic flows; False if the link was reset meanwhile."""
        await self._flowing.wait()
        if link not in self._links:
            return False
        writer.write(data)
        await writer.drain()
        return True

    async def _pump_late(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: list[float],
    ) -> None:
        """Like :meth:`_pump`, each chunk sent ``latency`` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_IN_FLIGHT)

        async def send() -> None:
            try:
                while True:
                    at, data = await due.get()
                    wait = at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not data:
                        _end_stream(writer)
                        return
                    if not await self._forward(link, writer, data):
                        return
            finally:
                while not due.empty():  # frees a reader waiting to put
                    due.get_nowait()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(_CHUNK)
                if sender.done():
                    break
                await due.put((loop.time() + self.latency + delay[0], data))
                delay[0] = 0.0
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender


def _end_stream(writer: asyncio.StreamWriter) -> None:
    """Pass an end of stream on; a TLS stream cannot half-close, so it stays open."""
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a proxy in this process until its standard input closes.

    Prints ``port N`` once it listens. Used by :class:`broker.testing.tls.TlsFront`
    to keep a front's TLS work off the measured process.
    """
    parser = argparse.ArgumentParser(
        prog="python -m broker.testing.faults", description=main.__doc__
    )
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--listen", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added each way")
    parser.add_argument("--cert-chain", help="PEM certificate chain: listen with TLS")
    parser.add_argument("--key", help="PEM private key of the certificate")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    tls = None
    if args.cert_chain:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert_chain, args.key)
    with FaultProxy(host, int(port), latency=args.latency, tls=tls, host=args.listen) as proxy:
        print(f"port {proxy.port}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
