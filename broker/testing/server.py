"""A real Bolt server for tests and demos, with no Docker and no Java install.

:class:`EmbeddedServer` runs ArcadeDB (from the ``arcadedb-embedded`` wheel,
which bundles a JRE) with its Neo4j Bolt plugin in a child process, on free
loopback ports, in a temporary directory, with a random password.
:class:`ExternalServer` stands for a server you already run (a real Neo4j),
chosen with ``NEO4J_URI``. Both offer the small :class:`BoltServer` interface,
so tests do not care which one they talk to.

``python -m broker.testing.server`` (or the ``neo4j-loop-broker-server``
command) starts a test server (:mod:`broker.testing.cli`), prints the
``NEO4J_*`` settings to export and runs until Ctrl-C or SIGTERM; ``--help``
lists its options, ``--server neo4j`` runs a real Neo4j instead
(:mod:`broker.testing.neo4j_server`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol, Self, runtime_checkable

from broker.testing.child_server import (
    ChildProcessServer,
    ServerError,
    _check_port_free,
    _free_ports,
)

__all__ = [
    "BoltServer",
    "EmbeddedServer",
    "ExternalServer",
    "ServerError",
    "server_from_env",
]

_DB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


@runtime_checkable
class BoltServer(Protocol):
    """What a test needs from a Bolt server, embedded or external."""

    @property
    def uri(self) -> str:
        """The Bolt URI to give the driver."""
        ...

    @property
    def auth(self) -> tuple[str, str]:
        """The (username, password) pair."""
        ...

    @property
    def default_database(self) -> str:
        """The database that queries naming none go to."""
        ...

    @property
    def supports_restart(self) -> bool:
        """True when :meth:`kill` and :meth:`restart` can be used."""
        ...

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database and return its name.

        A server that cannot create databases returns its default one.
        """
        ...

    def stop(self) -> None:
        """Release the server (stopping it if this process started it)."""
        ...


def _check_db_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(
            f"database name {name!r} must start with a letter and hold only "
            "letters, digits, '_' or '-' (at most 63 characters)"
        )
    return name


def _fresh_db_name() -> str:
    return "t" + uuid.uuid4().hex[:16]


def _check_port_number(name: str, port: int | None) -> int | None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ValueError(f"{name} must be an integer, got {type(port).__name__}")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{name} must be from 1 to 65535, got {port}")
    return port


class EmbeddedServer(ChildProcessServer):
    """An ArcadeDB server with the Bolt plugin, in a child process.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    :meth:`kill` ends the child with SIGKILL and keeps its directory and ports
    so that :meth:`restart` brings the same server back, data included.
    Ports are free ones unless ``bolt_port`` or ``http_port`` are given; a
    ``root`` directory given here is kept, a temporary one is removed.
    """

    username = "root"
    _temp_prefix = "broker-bolt-"

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None = None,
        password: str | None = None,
        default_database: str = "broker",
        heap: str | None = None,
        startup_timeout: float = 90.0,
        bolt_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self._fixed_ports = (
            _check_port_number("bolt_port", bolt_port),
            _check_port_number("http_port", http_port),
        )
        if bolt_port is not None and bolt_port == http_port:
            raise ValueError(f"bolt_port and http_port must differ, both are {bolt_port}")
        if password is not None and len(password) < 8:
            raise ValueError("the server's password must be at least 8 characters long")
        super().__init__(
            root=root,
            password=password,
            heap=heap or os.environ.get("BROKER_TEST_SERVER_HEAP", "512m"),
            startup_timeout=startup_timeout,
        )
        self._default_database = _check_db_name(default_database)
        self._ports: tuple[int, int, int] | None = None
        self._reused = False

    # -- what tests use -------------------------------------------------

    @property
    def default_database(self) -> str:
        return self._default_database

    @property
    def bolt_port(self) -> int:
        return self._require_ports()[0]

    @property
    def http_port(self) -> int:
        return self._require_ports()[1]

    # -- lifecycle ------------------------------------------------------

    def start(self) -> Self:
        """Start the server and return once Bolt answers."""
        super().start()
        if self._reused:
            try:
                self._http_command(None)
            except ServerError:
                self.stop()
                raise ServerError(
                    f"the server in {self._root} was first started with another password; "
                    "give that one"
                ) from None
        return self

    # -- databases ------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create a database through ArcadeDB's HTTP API and return its name."""
        name = _check_db_name(name or _fresh_db_name())
        self._http_command(f"create database {name}")
        return name

    def create_user(self, name: str, password: str) -> None:
        """Add a server user with ``password`` and admin rights on every database."""
        if not re.match(r"^[A-Za-z][A-Za-z0-9_-]{3,62}$", name):
            raise ValueError(
                f"user name {name!r} must start with a letter and hold 4 to 63 letters, "
                "digits, '_' or '-'"
            )
        spec = {"name": name, "password": password, "databases": {"*": "admin"}}
        self._http_command(f"create user {json.dumps(spec)}", shown=f"create user {name}")

    def drop_user(self, name: str) -> None:
        """Remove a server user added with :meth:`create_user`."""
        self._http_command(f"drop user {name}")

    def set_user_password(self, name: str, password: str) -> None:
        """Change a user's password: connections made from now on need the new one."""
        self.drop_user(name)
        self.create_user(name, password)

    def _http_command(self, command: str | None, shown: str | None = None) -> None:
        """Run a server command; with None, only check that the password is accepted.

        ``shown`` replaces the command in errors (it may hold a secret).
        """
        shown = command if shown is None else shown
        token = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/api/v1/"
            + ("server" if command is not None else "databases"),
            data=json.dumps({"command": command}).encode() if command is not None else None,
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
            method="POST" if command is not None else "GET",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:500]
            raise ServerError(f"server refused {shown!r}: HTTP {exc.code} {body}") from None
        except OSError as exc:
            raise ServerError(f"server did not answer {shown!r}: {exc}") from None

    # -- internals ------------------------------------------------------

    def _describe(self) -> str:
        return f"EmbeddedServer {self.uri if self._ports else 'no ports yet'}"

    def _name(self) -> str:
        return "the embedded server"

    def _prepare(self) -> None:
        if self._ports is None:
            for port in self._fixed_ports:
                if port is not None:
                    _check_port_free(port)
        # A kept directory keeps the password it was first started with.
        self._reused = self._root is not None and (
            (self._root / "server" / "config" / "server-users.jsonl").exists()
        )
        if self._reused and not self._password_given:
            raise ServerError(
                f"{self._root} holds a server started before, with a password of its "
                "own: give that password"
            )

    def _port_attempts(self) -> int:
        return 1 if self._ports or any(self._fixed_ports) else 3

    def _choose_ports(self, attempt: int) -> None:
        if self._ports is None or attempt:
            bolt, http = self._fixed_ports
            free = [p for p in _free_ports(3) if p not in self._fixed_ports]
            bolt = bolt or free.pop()
            http = http or free.pop()
            self._ports = (bolt, http, free.pop())

    def _started_once(self) -> bool:
        return self._ports is not None

    def _require_ports(self) -> tuple[int, int, int]:
        if self._ports is None:
            raise ServerError("the server has not been started")
        return self._ports

    def _spawn(self) -> None:
        bolt, http, https = self._require_ports()
        root = self.root
        settings = {
            "root": str(root / "server"),
            "password": self._password,
            "bolt_port": bolt,
            "http_port": http,
            "https_port": https,
            "heap": self._heap,
            "default_database": self._default_database,
            # Removed by the child itself if this process dies without stop().
            "cleanup_dir": str(root) if self._owns_root else None,
        }
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "broker.testing._arcadedb", "--ready-fd", str(write_fd)]
        try:
            first_line = json.dumps(settings).encode()
            with self._child(command, first_line, handed_fds=(write_fd,)) as proc:
                self._wait_ready(read_fd, proc)
        finally:
            os.close(read_fd)

    def _wait_ready(self, read_fd: int, proc: subprocess.Popen[bytes]) -> None:
        """Wait for ``READY`` on the pipe the child was handed, then for Bolt."""
        deadline = time.monotonic() + self._startup_timeout
        buffer = b""
        while b"READY" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._too_slow()
            readable, _, _ = select.select([read_fd], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(read_fd, 64)
                if not chunk:
                    proc.wait(timeout=5)
                    raise self._exited(proc)
                buffer += chunk
        self._wait_bolt(deadline)


class ExternalServer:
    """A Bolt server this process did not start, such as a real Neo4j.

    It cannot be killed or restarted from here. :meth:`create_database` uses
    ``CREATE DATABASE`` where the server allows it (Neo4j Enterprise) and
    otherwise returns the default database, so tests keep their data apart
    with labels of their own.
    """

    supports_restart = False

    def __init__(self, uri: str, username: str, password: str) -> None:
        self._uri = uri
        self._username = username
        self._password = password
        self._default: str | None = None

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def auth(self) -> tuple[str, str]:
        return (self._username, self._password)

    @property
    def password(self) -> str:
        return self._password

    @property
    def default_database(self) -> str:
        if self._default is None:
            records = self._system_query("SHOW DATABASES YIELD name, default")
            defaults = [r["name"] for r in records if r["default"]]
            if not defaults:
                raise ServerError("the server reports no default database")
            self._default = str(defaults[0])
        return self._default

    def __repr__(self) -> str:
        return f"<ExternalServer {self._uri}>"

    def create_database(self, name: str | None = None) -> str:
        import neo4j.exceptions

        name = _check_db_name(name or _fresh_db_name())
        try:
            self._system_query("CREATE DATABASE $name IF NOT EXISTS WAIT", name=name)
        except neo4j.exceptions.ClientError:
            return self.default_database
        return name

    def stop(self) -> None:
        """Nothing to stop: this process did not start the server."""

    def kill(self) -> None:
        raise ServerError("an external server cannot be killed from the tests")

    def restart(self) -> Self:
        raise ServerError("an external server cannot be restarted from the tests")

    def _system_query(self, query: str, **params: object) -> list[dict[str, object]]:
        import neo4j

        with neo4j.GraphDatabase.driver(self._uri, auth=self.auth) as driver:
            records, _, _ = driver.execute_query(query, params, database_="system")
        return [r.data() for r in records]


def server_from_env() -> ExternalServer | None:
    """The server named by ``NEO4J_URI``, if that variable is set."""
    uri = os.environ.get("NEO4J_URI")
    if not uri:
        return None
    return ExternalServer(
        uri,
        os.environ.get("NEO4J_USERNAME", "neo4j"),
        os.environ.get("NEO4J_PASSWORD", ""),
    )


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """The command line's options (see :mod:`broker.testing.cli`)."""
    from broker.testing import cli

    return cli.parse_args(argv, environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Start a test server, print how to reach it, run until Ctrl-C or SIGTERM."""
    from broker.testing import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
