"""A database server for tests run in a child process of its own, on loopback.

:class:`ChildProcessServer` holds what the embedded ArcadeDB server
(:class:`~broker.testing.server.EmbeddedServer`) and Neo4j Community
(:class:`~broker.testing.neo4j_server.Neo4jServer`) share: a directory (a
temporary one is removed by :meth:`~ChildProcessServer.stop`, or by the child
if this process dies), a random password handed over on the child's standard
input and never on its command line, the child in a process group of its own
so that SIGKILL ends all of it, and start, stop, kill and restart. A subclass
says how to launch its child, which ports it listens on and how it tells that
it is ready.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Self

from broker.testing.service import Service

__all__ = ["ChildProcessServer", "ServerError"]


class ServerError(RuntimeError):
    """The test server could not be started, reached or changed."""


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out on loopback, all distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServerError(f"port {port} on 127.0.0.1 is not free: {exc.strerror}") from None


def _port_answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


_live: weakref.WeakSet[ChildProcessServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


class ChildProcessServer(Service):
    """A server in a child process with Bolt on 127.0.0.1; subclasses say how to launch it.

    :meth:`kill` ends the child with SIGKILL and keeps its directory and ports
    so that :meth:`restart` brings the same server back, data included.
    """

    supports_restart = True
    username: str
    #: The prefix of the temporary directory made when no ``root`` is given.
    _temp_prefix = "broker-server-"
    #: How long :meth:`stop` waits for the child to end after ``STOP``.
    _stop_timeout = 30.0

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None,
        password: str | None,
        heap: str,
        startup_timeout: float,
    ) -> None:
        self._owns_root = root is None
        self._root = Path(root) if root is not None else None
        self._password_given = password is not None
        self._password = password or secrets.token_urlsafe(18)
        self._heap = heap
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- what tests use -------------------------------------------------

    @property
    def bolt_port(self) -> int:
        raise NotImplementedError

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self._password)

    @property
    def password(self) -> str:
        return self._password

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
        return f"<{self._describe()} {state}>"

    # -- what a subclass says -------------------------------------------

    def _describe(self) -> str:
        """The class and where it listens, for ``repr`` (never the password)."""
        raise NotImplementedError

    def _name(self) -> str:
        """The server's name in error messages."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Check and make what a start needs before the directory is made."""

    def _port_attempts(self) -> int:
        """How many sets of ports a start tries (a port may be taken meanwhile)."""
        raise NotImplementedError

    def _choose_ports(self, attempt: int) -> None:
        """Choose the ports for the ``attempt``-th try of a start."""
        raise NotImplementedError

    def _started_once(self) -> bool:
        """Whether there is a server to :meth:`restart`."""
        raise NotImplementedError

    def _spawn(self) -> None:
        """Launch the child (with :meth:`_child`) and return once Bolt answers."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------

    def start(self) -> Self:
        """Start the server and return once Bolt answers."""
        with self._lock:
            if self.running:
                raise ServerError("the server is already running")
            self._prepare()
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix=self._temp_prefix))
            else:
                self._root.mkdir(parents=True, exist_ok=True)
            _live.add(self)
            attempts = self._port_attempts()
            for attempt in range(attempts):
                self._choose_ports(attempt)
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
        """Start again on the same directory and ports (after kill or stop)."""
        if not self._started_once():
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
        """SIGKILL the server process; directory, password and ports are kept."""
        with self._lock:
            if self._proc is not None:
                self._reap()

    def stop(self) -> None:
        """Stop the server and remove its temporary directory.

        When :meth:`_stops_cleanly`, the child is asked to ``STOP`` and given
        :attr:`_stop_timeout` seconds; then its whole process group is killed.
        """
        with self._lock:
            proc = self._proc
            if proc is not None:
                if proc.stdin is not None and self._stops_cleanly():
                    with contextlib.suppress(OSError):
                        proc.stdin.write(b"STOP\n")
                        proc.stdin.close()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self._stop_timeout)
                # The JVM may have started helpers in its session.
                self._reap()
            self._cleanup_files()
            _live.discard(self)

    def _stops_cleanly(self) -> bool:
        """Whether :meth:`stop` asks the child to stop before killing it."""
        return True

    # -- internals ------------------------------------------------------

    @contextlib.contextmanager
    def _child(
        self,
        command: Sequence[str],
        first_line: bytes,
        *,
        cwd: Path | None = None,
        handed_fds: Sequence[int] = (),
    ) -> Iterator[subprocess.Popen[bytes]]:
        """Launch ``command`` in a session of its own and send it ``first_line`` on stdin.

        The child logs to ``server.log``; ``handed_fds`` are passed to it and
        closed here. An error inside the ``with`` kills the child.
        """
        try:
            log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in _close_pipes
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    pass_fds=tuple(handed_fds),
                    start_new_session=True,
                )
            except BaseException:
                log.close()
                raise
        finally:
            for fd in handed_fds:
                os.close(fd)
        self._proc, self._log = proc, log
        try:
            assert proc.stdin is not None
            proc.stdin.write(first_line + b"\n")
            proc.stdin.flush()
            yield proc
        except BaseException:
            self._reap()
            raise

    def _reap(self) -> None:
        """SIGKILL the child's process group, wait for the child, forget it."""
        proc = self._proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._close_pipes()
        self._proc = None

    def _exited(self, proc: subprocess.Popen[bytes]) -> ServerError:
        return ServerError(
            f"{self._name()} exited with status {proc.returncode}; "
            f"its log ends with:\n{self._log_tail()}"
        )

    def _too_slow(self) -> ServerError:
        return ServerError(
            f"{self._name()} did not start in {self._startup_timeout:.0f} s; "
            f"its log ends with:\n{self._log_tail()}"
        )

    def _wait_bolt(self, deadline: float) -> None:
        bolt = self.bolt_port
        while not _port_answers(bolt):
            if time.monotonic() > deadline:
                raise ServerError(f"Bolt port {bolt} does not answer")
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
