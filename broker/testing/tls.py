"""A TLS front for a plain Bolt server, with a throwaway certificate authority.

The embedded server speaks Bolt without TLS; production servers (Neo4j Aura
takes ``neo4j+s://`` only) do not. :class:`TlsFront` terminates TLS on a
loopback port and forwards to the server, optionally with added latency, so
tests and benchmarks reach a real server the way a deployment does. Its
certificate comes from a CA made for this front alone (``trustme``), written
to :attr:`TlsFront.ca_file` for drivers to trust:

- ``bolt+ssc://`` and ``neo4j+ssc://`` accept the certificate unverified;
- ``bolt+s://`` and ``neo4j+s://`` verify it against the system's CAs, which
  a private CA joins through ``SSL_CERT_FILE`` (see :meth:`TlsFront.trusting_env`);
- ``bolt://`` and ``neo4j://`` with ``driver_options`` of
  :meth:`TlsFront.driver_options` verify it against this CA alone (the driver
  accepts ``trusted_certificates`` with these schemes only).
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import IO, Any, Self

import neo4j
import trustme

from broker.testing.faults import FaultProxy
from broker.testing.service import Service

__all__ = ["TlsFront"]

#: Names on the front's certificate: the address drivers are given.
HOST = "127.0.0.1"


class TlsFront(Service):
    """A TLS-terminating listener in front of ``target_host:target_port``.

    ``latency`` adds that many seconds to every chunk, each way (see
    :class:`~broker.testing.faults.FaultProxy`). With ``in_process=False``
    the front runs in a child process, so that its TLS work is not counted
    against the process being measured. Everything it made (listener,
    process, certificate files) is gone after :meth:`stop`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        latency: float = 0.0,
        in_process: bool = True,
    ) -> None:
        self.target = (target_host, target_port)
        self.latency = latency
        self.in_process = in_process
        self.port = 0
        self._ca = trustme.CA()
        self._cert = self._ca.issue_cert(HOST, "localhost")
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proxy: FaultProxy | None = None
        self._child: subprocess.Popen[str] | None = None

    @classmethod
    def for_uri(cls, uri: str, **options: Any) -> Self:
        """A front for the server at a plain ``bolt://host:port`` URI."""
        parts = urllib.parse.urlsplit(uri)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"uri {uri!r} names no host and port")
        return cls(parts.hostname, parts.port, **options)

    # -- life ----------------------------------------------------------------

    def start(self) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="broker-tls-")
        try:
            self._ca.cert_pem.write_to_path(str(self.ca_file))
            if self.in_process:
                self._proxy = FaultProxy(*self.target, latency=self.latency, tls=self._context())
                self._proxy.start()
                self.port = self._proxy.port
            else:
                self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._child is not None:
            _end(self._child)
            self._child = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # -- what drivers need -------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA's certificate (PEM), while the front runs."""
        if self._dir is None:
            raise RuntimeError("the TLS front has not been started")
        return Path(self._dir.name) / "ca.pem"

    def uri(self, scheme: str = "bolt+s") -> str:
        """The front's address with ``scheme`` (``bolt+s``, ``neo4j+ssc``, ``bolt`` ...)."""
        if not self.port:
            raise RuntimeError("the TLS front has not been started")
        return f"{scheme}://{HOST}:{self.port}"

    def driver_options(self, scheme: str = "bolt") -> dict[str, Any]:
        """``driver_options`` for reaching the server through this front with ``scheme``.

        ``bolt`` and ``neo4j`` get TLS trusting this front's CA alone. The
        routing schemes get a resolver too: the server names its own plain
        address in routing tables, which the resolver maps to the front (a
        cluster behind a TLS terminator advertises the terminator instead).
        """
        options: dict[str, Any] = {}
        if scheme in {"bolt", "neo4j"}:
            options["encrypted"] = True
            options["trusted_certificates"] = neo4j.TrustCustomCAs(str(self.ca_file))
        if scheme.startswith("neo4j"):
            options["resolver"] = self._resolve
        return options

    def trusting_env(self) -> dict[str, str]:
        """Environment under which ``bolt+s://`` and ``neo4j+s://`` trust this front's CA."""
        return {"SSL_CERT_FILE": str(self.ca_file)}

    @property
    def pid(self) -> int | None:
        """The id of the front's own process, when it runs in one."""
        return None if self._child is None else self._child.pid

    @property
    def accepted(self) -> int:
        """Connections accepted so far (by a front in this process)."""
        if self._proxy is None:
            raise RuntimeError("only a started front in this process counts its connections")
        return self._proxy.accepted

    # -- inside ------------------------------------------------------------------

    def _resolve(self, address: neo4j.Address) -> list[tuple[str, int]]:
        """The server's own address, and the front's, both lead to the front."""
        if address.port in {self.target[1], self.port}:
            return [(HOST, self.port)]
        return [(address.host, address.port)]

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        return context

    def _spawn(self) -> None:
        assert self._dir is not None
        folder = Path(self._dir.name)
        chain, key = folder / "server.pem", folder / "server.key"
        self._cert.private_key_pem.write_to_path(str(key))
        with chain.open("wb") as out:
            for blob in self._cert.cert_chain_pems:
                out.write(blob.bytes())
        host, port = self.target
        command = [
            sys.executable,
            "-m",
            "broker.testing.faults",
            f"--target={host}:{port}",
            f"--latency={self.latency}",
            f"--cert-chain={chain}",
            f"--key={key}",
        ]
        self._child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = _first_line(self._child.stdout)
        if not line.startswith("port "):
            raise RuntimeError(f"the TLS front did not start (said {line!r})")
        self.port = int(line.split()[1])


def _first_line(stream: IO[str] | None) -> str:
    return "" if stream is None else stream.readline().strip()


def _end(child: subprocess.Popen[str]) -> None:
    """Close the child's input (it exits on that), and make sure it is gone."""
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
