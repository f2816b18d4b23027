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

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Self

from broker.testing.neo4j_build import Neo4jBuild, ensure_build, resolve_version
from broker.testing.server import ServerError, _check_port_free, _free_ports, _port_answers
from broker.testing.service import Service

if TYPE_CHECKING:
    import neo4j

__all__ = ["Neo4jServer"]

_USER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{3,62}$")
_live: weakref.WeakSet[Neo4jServer] = weakref.WeakSet()


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


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


class Neo4jServer(Service):
    """Neo4j Community with Bolt on 127.0.0.1, in a child JVM.

    ``version`` defaults to ``BROKER_TEST_NEO4J_VERSION``, else the 5.26 LTS;
    ``java`` defaults to ``$JAVA_HOME/bin/java``, else the one on PATH. A
    ``root`` directory given here is kept (with its password), a temporary
    one is removed by :meth:`stop`, or by the child if this process dies.
    ``settings`` adds ``neo4j.conf`` lines (default: ``BROKER_TEST_NEO4J_SETTINGS``,
    ``name=value`` pairs separated by ``;``), e.g. to measure a server setting.
    """

    supports_restart = True
    username = "neo4j"
    default_database = "neo4j"

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
        self._java = java
        self._owns_root = root is None
        self._root = Path(root) if root is not None else None
        self._password = password or secrets.token_urlsafe(18)
        self._fixed_port = bolt_port
        self._port: int | None = None
        self._heap = heap or os.environ.get("BROKER_TEST_NEO4J_HEAP", "1g")
        self._startup_timeout = startup_timeout
        self._extra = _checked_settings(settings if settings is not None else _settings_from_env())
        self._build: Neo4jBuild | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- what tests use -------------------------------------------------

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"

    @property
    def routing_uri(self) -> str:
        """The ``neo4j://`` URI: the driver asks the server for its routing table."""
        return f"neo4j://127.0.0.1:{self.bolt_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self._password)

    @property
    def password(self) -> str:
        return self._password

    @property
    def bolt_port(self) -> int:
        if self._port is None:
            raise ServerError("the server has not been started")
        return self._port

    @property
    def root(self) -> Path:
        if self._root is None:
            raise ServerError("the server has not been started")
        return self._root

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.uri if self._port else "no port yet"
        return f"<Neo4jServer {self.version} {where} {state}>"

    # -- lifecycle ------------------------------------------------------

    def start(self) -> Self:
        """Build Neo4j if needed, start it and return once Bolt answers."""
        with self._lock:
            if self.running:
                raise ServerError("the server is already running")
            self._build = ensure_build(self.version, java=self._java)
            if self._fixed_port is not None:
                _check_port_free(self._fixed_port)
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="broker-neo4j-"))
            else:
                self._root.mkdir(parents=True, exist_ok=True)
            _live.add(self)
            attempts = 1 if self._fixed_port else 3
            for attempt in range(attempts):
                self._port = self._fixed_port or _free_ports(1)[0]
                try:
                    self._spawn()
                    break
                except ServerError:
                    if attempt == attempts - 1:
                        self._cleanup_files()
                        _live.discard(self)
                        raise
        return self

    def restart(self) -> Self:
        """Start again on the same directory and port (after kill or stop)."""
        if self._port is None or self._build is None:
            raise ServerError("restart() needs a server that was started once")
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                with self._lock:
                    if self.running:
                        raise ServerError("the server is already running")
                    _live.add(self)
                    self._spawn()
                return self
            except ServerError:
                # The old listener's port may take a moment to be released.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the JVM; directory, password and port are kept."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._close_pipes()
            self._proc = None

    def stop(self) -> None:
        """Stop the JVM and remove a temporary directory.

        A kept directory is shut down cleanly (STOP, SIGKILL after 60 s); a
        temporary one is about to be removed, so its JVM is killed at once.
        """
        with self._lock:
            proc = self._proc
            if proc is not None:
                if proc.stdin is not None and not self._owns_root:
                    with contextlib.suppress(OSError):
                        proc.stdin.write(b"STOP\n")
                        proc.stdin.close()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=60)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self._close_pipes()
                self._proc = None
            self._cleanup_files()
            _live.discard(self)

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
            with self._driver() as driver:
                driver.execute_query(query, params, database_="system")
        except neo4j.exceptions.Neo4jError as exc:
            raise ServerError(f"Neo4j refused a user command: {exc.code}") from None

    # -- internals ------------------------------------------------------

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
        log = open(root / "server.log", "ab")  # noqa: SIM115 - closed in _close_pipes
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._proc, self._log = proc, log
        try:
            assert proc.stdin is not None
            proc.stdin.write(self._password.encode() + b"\n")
            proc.stdin.flush()
            self._wait_ready(proc, ready)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._close_pipes()
            self._proc = None
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready: Path) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise ServerError(
                    f"Neo4j {self.version} exited with status {proc.returncode}; "
                    f"its log ends with:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"Neo4j {self.version} did not start in {self._startup_timeout:.0f} s; "
                    f"its log ends with:\n{self._log_tail()}"
                )
            time.sleep(0.1)
        while not _port_answers(self.bolt_port):
            if time.monotonic() > deadline:
                raise ServerError(f"Bolt port {self.bolt_port} does not answer")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self._password, "***")

    def _close_pipes(self) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup_files(self) -> None:
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _user(name: str) -> str:
    if not _USER_NAME.match(name):
        raise ValueError(
            f"user name {name!r} must start with a letter and hold 4 to 63 letters, digits or '_'"
        )
    return name
