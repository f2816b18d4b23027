"""The ``neo4j-loop-broker-server`` command: a test server for other tools.

It starts the embedded ArcadeDB (the default) or a real Neo4j Community
(``--server neo4j``), prints the ``NEO4J_*`` settings to export and runs
until Ctrl-C or SIGTERM. Also run as ``python -m broker.testing.server``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.testing.neo4j_build import Neo4jBuildError
from broker.testing.neo4j_server import Neo4jServer
from broker.testing.selection import KINDS, LocalServer, local_kind
from broker.testing.server import EmbeddedServer, ServerError, _check_db_name

__all__ = ["main", "parse_args"]


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """The command line's options; the password may come from ``NEO4J_PASSWORD``."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description=(
            "Start a Bolt server for tests on 127.0.0.1 (the embedded ArcadeDB, or a real "
            "Neo4j Community), print the NEO4J_* settings to export, and run until Ctrl-C "
            "or SIGTERM."
        ),
    )
    parser.add_argument(
        "--server",
        choices=KINDS,
        default="arcadedb",
        help="which server (default: %(default)s); neo4j needs java and mvn, and is built "
        "once into ~/.cache/neo4j-loop-broker",
    )
    parser.add_argument(
        "--neo4j-version",
        metavar="VERSION",
        help="Neo4j version, or 'lts' or 'current' (default: BROKER_TEST_NEO4J_VERSION, else "
        "the 5.26 LTS); 2025.x and later need a Java 21+ JAVA_HOME",
    )
    parser.add_argument(
        "--java", metavar="PATH", help="the java to run Neo4j with (default: JAVA_HOME's)"
    )
    parser.add_argument(
        "--bolt-port", type=_port_arg, metavar="PORT", help="Bolt port (default: a free one)"
    )
    parser.add_argument(
        "--http-port",
        type=_port_arg,
        metavar="PORT",
        help="ArcadeDB's HTTP port, used to create databases (default: a free one)",
    )
    parser.add_argument(
        "--password",
        default=env.get("NEO4J_PASSWORD") or None,
        help=(
            "password of the server's user, at least 8 characters (default: NEO4J_PASSWORD, "
            "else a random one); prefer NEO4J_PASSWORD, as other users can see a command line"
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep the server's files here, kept at exit; a directory used before needs the "
        "password it was first started with (default: a temporary directory, removed at exit)",
    )
    parser.add_argument(
        "--database",
        default="broker",
        metavar="NAME",
        help="ArcadeDB: database to create if missing and make the default; printed as "
        "NEO4J_DATABASE (default: %(default)s; Neo4j Community always uses 'neo4j')",
    )
    options = parser.parse_args(argv)
    if options.password is not None and len(options.password) < 8:
        parser.error("the password must be at least 8 characters long")
    try:
        _check_db_name(options.database)
        local_kind(options.server)
    except ValueError as exc:
        parser.error(str(exc))
    if options.server == "neo4j" and options.http_port is not None:
        parser.error("--http-port is for ArcadeDB; Neo4j runs Bolt only")
    return options


def _program_name() -> str:
    command = Path(sys.argv[0]).name
    return "python -m broker.testing.server" if command.endswith(".py") else command


def _port_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1 to 65535")
    return int(text)


def _server(options: argparse.Namespace) -> LocalServer:
    where = {"root": options.data_dir, "password": options.password, "bolt_port": options.bolt_port}
    if options.server == "neo4j":
        return Neo4jServer(version=options.neo4j_version, java=options.java, **where)
    return EmbeddedServer(default_database=options.database, http_port=options.http_port, **where)


def main(argv: Sequence[str] | None = None) -> int:
    """Start a test server, print how to reach it, run until Ctrl-C or SIGTERM."""
    options = parse_args(argv)
    server = _server(options)
    # Ctrl-C and TERM stop it the same way, even where SIGINT was ignored (started with &).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    status = 0
    name = f"Neo4j {server.version}" if isinstance(server, Neo4jServer) else "embedded Bolt"
    try:
        print(f"Starting the {name} server ...", file=sys.stderr, flush=True)
        server.start()
        _print_settings(server)
        kept = "kept" if options.data_dir is not None else "removed"
        print(
            f"Running; data directory: {server.root} ({kept} at exit). "
            "Press Ctrl-C (or send SIGTERM) to stop.",
            file=sys.stderr,
            flush=True,
        )
        while server.running:
            time.sleep(0.5)
        print("The server exited on its own.", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        pass
    except (ServerError, Neo4jBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        server.stop()
    print("stopped", file=sys.stderr)
    return status


def _print_settings(server: LocalServer) -> None:
    for name, value in (
        ("NEO4J_URI", server.uri),
        ("NEO4J_USERNAME", server.username),
        ("NEO4J_PASSWORD", server.password),
        ("NEO4J_DATABASE", server.default_database),
    ):
        print(f"export {name}={shlex.quote(value)}")
    sys.stdout.flush()
