"""A real Neo4j Community server for tests, in a child JVM on loopback.

:class:`Neo4jServer` runs the DBMS built by
:func:`~broker.testing.neo4j_build.ensure_build` through the project's
launcher, with Bolt on a free loopback port, authentication on and a random
password, which travels over the child's standard input, never its command
line. Like :class:`~broker.testing.server.EmbeddedServer` it can be killed
with SIGKILL and restarted over the same data directory and port.

Community has one user database, ``neo4j``, and refuses ``CREATE DATABASE``.
So :meth:`Neo4jServer.create_database` empties that database (nodes,
indexes and constraints) and returns its name: a test that asks for a fresh
database gets an empty one, as long as tests run one after the other in one
process, as the project's suite does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from broker.testing.child_server import (
    ChildProcessServer,
    ServerError,
    _check_port_free,
    _free_ports,
)
from broker.testing.neo4j_build import Neo4jBuild, ensure_build, resolve_version

if TYPE_CHECKING:
    import neo4j

__all__ = ["Neo4jServer", "quiet_driver_log"]

_USER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{3,62}$")

_SETTING_NAME = re.compile(r"^[a-z][a-z0-9_.]*$")
_SETTING_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]*$")


def _settings_from_env() -> dict[str, str]:
    raw = os.environ.get("BROKER_TEST_NEO4J_SETTINGS", "")
    pairs = [item.split("=", 1) for item in raw.split(";") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError("BROKER_TEST_NEO4J_SETTINGS takes name=value pairs separated by ';'")
    return {name.strip(): value.strip() for name, value in pairs}


def _checked_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """Extra ``neo4j.conf`` settings, one plain line each (no newline, no escape)."""
    for name, value in settings.items():
        if not _SETTING_NAME.match(name) or not _SETTING_VALUE.match(value):
            raise ValueError(f"not a plain Neo4j setting: {name!r}")
    return dict(settings)


class Neo4jServer(ChildProcessServer):
    """Neo4j Community with Bolt on 127.0.0.1, in a child JVM.

    ``version`` defaults to ``BROKER_TEST_NEO4J_VERSION``, else the 5.26 LTS;
    ``java`` defaults to ``$JAVA_HOME/bin/java``, else the one on PATH. A
    ``root`` directory given here is kept (with its password), a temporary
    one is removed by :meth:`stop`, or by the child if this process dies.
    A kept directory is shut down cleanly by :meth:`stop` (``STOP``, SIGKILL
    after 60 s); a temporary one is about to be removed, so its JVM is killed
    at once. ``settings`` adds ``neo4j.conf`` lines (default:
    ``BROKER_TEST_NEO4J_SETTINGS``, ``name=value`` pairs separated by ``;``),
    e.g. to measure a server setting.
    """

    username = "neo4j"
    default_database = "neo4j"
    _temp_prefix = "broker-neo4j-"
    _stop_timeout = 60.0

    def __init__(
        self,
        *,
        version: str | None = None,
        java: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        password: str | None = None,
        bolt_port: int | None = None,
        heap: str | None = None,
        startup_timeout: float = 180.0,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if password is not None and len(password) < 8:
            raise ValueError("Neo4j's password must be at least 8 characters long")
        self.version = resolve_version(version)
        super().__init__(
            root=root,
            password=password,
            heap=heap or os.environ.get("BROKER_TEST_NEO4J_HEAP", "1g"),
            startup_timeout=startup_timeout,
        )
        self._java = java
        self._fixed_port = bolt_port
        self._port: int | None = None
        self._build: Neo4jBuild | None = None
        self._extra = _checked_settings(settings if settings is not None else _settings_from_env())

    # -- what tests use -------------------------------------------------

    @property
    def routing_uri(self) -> str:
        """The ``neo4j://`` URI: the driver asks the server for its routing table."""
        return f"neo4j://127.0.0.1:{self.bolt_port}"

    @property
    def bolt_port(self) -> int:
        if self._port is None:
            raise ServerError("the server has not been started")
        return self._port

    # -- databases and users --------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Empty the one database of Community and return its name, ``neo4j``.

        ``name`` is ignored: Community refuses ``CREATE DATABASE``.
        """
        del name
        with self._driver() as driver:
            with driver.session(database=self.default_database) as session:
                # Batches need an auto-commit transaction: a session's run().
                session.run(
                    "MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 5000 ROWS"
                ).consume()
            for kind in ("CONSTRAINTS", "INDEXES"):
                records, _, _ = driver.execute_query(f"SHOW {kind} YIELD name, type")
                for record in records:
                    if kind == "INDEXES" and record["type"] == "LOOKUP":
                        continue
                    driver.execute_query(
                        f"DROP {kind[:-1] if kind == 'CONSTRAINTS' else 'INDEX'} "
                        f"`{record['name']}` IF EXISTS"
                    )
        return self.default_database

    def create_user(self, name: str, password: str) -> None:
        """Add a user; on Community every user may read and write every database."""
        self._system(
            f"CREATE USER {_user(name)} SET PASSWORD $password CHANGE NOT REQUIRED",
            password=password,
        )

    def drop_user(self, name: str) -> None:
        """Remove a user added with :meth:`create_user`."""
        self._system(f"DROP USER {_user(name)} IF EXISTS")

    def set_user_password(self, name: str, password: str) -> None:
        """Change a user's password: logins from now on need the new one."""
        self._system(
            f"ALTER USER {_user(name)} SET PASSWORD $password CHANGE NOT REQUIRED",
            password=password,
        )

    def _driver(self) -> neo4j.Driver:
        import neo4j

        return neo4j.GraphDatabase.driver(self.uri, auth=self.auth)

    def _system(self, query: str, **params: object) -> None:
        import neo4j.exceptions

        try:
            with quiet_driver_log(), self._driver() as driver:
                driver.execute_query(query, params, database_="system")
        except neo4j.exceptions.Neo4jError as exc:
            raise ServerError(f"Neo4j refused a user command: {exc.code}") from None

    # -- internals ------------------------------------------------------

    def _describe(self) -> str:
        return f"Neo4jServer {self.version} {self.uri if self._port else 'no port yet'}"

    def _name(self) -> str:
        return f"Neo4j {self.version}"

    def _prepare(self) -> None:
        """Build Neo4j if needed (before any directory is made), check a fixed port."""
        self._build = ensure_build(self.version, java=self._java)
        if self._fixed_port is not None:
            _check_port_free(self._fixed_port)

    def _port_attempts(self) -> int:
        return 1 if self._fixed_port else 3

    def _choose_ports(self, attempt: int) -> None:
        self._port = self._fixed_port or _free_ports(1)[0]

    def _started_once(self) -> bool:
        return self._port is not None and self._build is not None

    def _stops_cleanly(self) -> bool:
        return not self._owns_root

    def _settings(self) -> str:
        address = f"127.0.0.1:{self.bolt_port}"
        return "\n".join(
            [
                # Settings a version does not know are warnings, not errors.
                "server.config.strict_validation.enabled=false",
                "server.default_listen_address=127.0.0.1",
                "server.default_advertised_address=127.0.0.1",
                "server.bolt.enabled=true",
                f"server.bolt.listen_address={address}",
                f"server.bolt.advertised_address={address}",
                "server.bolt.tls_level=DISABLED",
                "dbms.security.auth_enabled=true",
                "server.memory.pagecache.size=128m",
                "dbms.usage_report.enabled=false",
                *(f"{name}={value}" for name, value in self._extra.items()),
                "",
            ]
        )

    def _spawn(self) -> None:
        build = self._build
        assert build is not None
        root = self.root
        home = root / "dbms"
        home.mkdir(exist_ok=True)
        settings = root / "neo4j.conf"
        settings.write_text(self._settings())
        ready = root / "ready"
        ready.unlink(missing_ok=True)
        command = [
            str(build.java),
            f"-Xmx{self._heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-cp",
            build.classpath,
            "Neo4jLauncher",
            str(home),
            str(settings),
            str(ready),
            # Removed by the child itself if this process dies without stop().
            str(root) if self._owns_root else "-",
        ]
        with self._child(command, self._password.encode(), cwd=root) as proc:
            self._wait_ready(proc, ready)

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready: Path) -> None:
        """Wait for the launcher's ready file, then for Bolt."""
        deadline = time.monotonic() + self._startup_timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise self._exited(proc)
            if time.monotonic() > deadline:
                raise self._too_slow()
            time.sleep(0.1)
        self._wait_bolt(deadline)


def _user(name: str) -> str:
    if not _USER_NAME.match(name):
        raise ValueError(
            f"user name {name!r} must start with a letter and hold 4 to 63 letters, digits or '_'"
        )
    return name


@contextlib.contextmanager
def quiet_driver_log() -> Iterator[None]:
    """No debug line from the neo4j driver meanwhile: it logs a query's
    parameters, and a user command's parameters hold a password."""
    logger = logging.getLogger("neo4j")
    level = logger.level
    logger.setLevel(max(level, logging.INFO))
    try:
        yield
    finally:
        logger.setLevel(level)
