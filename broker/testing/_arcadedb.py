"""Child process that hosts one embedded ArcadeDB server with its Bolt plugin.

Run only by :class:`broker.testing.server.EmbeddedServer`, never imported by
the test process, so the JVM always lives in a process of its own.

Protocol with the parent:
- stdin: one JSON line of settings (the password travels here, never in argv);
  after that, ``STOP`` means "stop now", and end of file without it means the
  parent died: stop, and remove the parent's temporary directory too.
- the file descriptor named by ``--ready-fd``: ``READY`` once Bolt listens.
- stdout and stderr: the server's own log, redirected by the parent to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from typing import Any

BOLT_PLUGIN = "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"


def _serve(settings: dict[str, Any], ready_fd: int) -> None:
    # The engine writes ./log (and JVM crash files) relative to the working
    # directory: keep them inside the server's own directory.
    os.makedirs(settings["root"], exist_ok=True)
    os.chdir(settings["root"])

    import arcadedb_embedded

    server = arcadedb_embedded.ArcadeDBServer(
        root_path=settings["root"],
        root_password=settings["password"],
        config={
            "host": "127.0.0.1",
            "server_plugins": BOLT_PLUGIN,
            "bolt_port": settings["bolt_port"],
            "http_port": settings["http_port"],
            "server_httpsIncomingPort": settings["https_port"],
            # Otherwise the "default" database is whichever comes first in the
            # engine's own order, and it moves as databases are added.
            "bolt_defaultDatabase": settings["default_database"],
        },
        jvm_kwargs={"heap_size": settings["heap"]},
    )
    server.start()
    # A query that names no database fails until one exists: make the default.
    server.create_database(settings["default_database"])

    stopped = threading.Event()

    def stop(*_: object) -> None:
        if not stopped.is_set():
            stopped.set()
            server.stop()

    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())

    with os.fdopen(ready_fd, "w") as ready:
        ready.write("READY\n")

    orphaned = True
    for line in sys.stdin:
        if line.strip() == "STOP":
            orphaned = False
            break
    stop()
    if orphaned and settings.get("cleanup_dir"):
        shutil.rmtree(settings["cleanup_dir"], ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    settings = json.loads(sys.stdin.readline())
    _serve(settings, args.ready_fd)
    # JPype's shutdown can wait on non-daemon JVM threads: leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
