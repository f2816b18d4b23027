"""The test server itself: start, query, kill -9 and restart, stop, and the NEO4J_URI switch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import neo4j
import neo4j.exceptions
import pytest

from broker.testing import EmbeddedServer, ExternalServer, Neo4jServer, server_from_env
from broker.testing import server as server_module
from broker.testing.child_server import _port_answers
from broker.testing.pytest_plugin import select_server
from broker.testing.sockets import open_connections
from tests.helpers import eventually

pytestmark = pytest.mark.slow


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _query(uri: str, auth: tuple[str, str], database: str | None = None) -> int:
    async with neo4j.AsyncGraphDatabase.driver(uri, auth=auth) as driver:
        records, _, _ = await driver.execute_query("RETURN 41 + 1 AS x", database_=database)
        return int(records[0]["x"])


def _started_with(tmp: str) -> list[int]:
    """Processes whose environment names ``tmp`` as TMPDIR: what a test's command started."""
    mark = f"TMPDIR={tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def own_tmpdir() -> Iterator[dict[str, str]]:
    """An environment (no NEO4J_*) whose TMPDIR is a directory of this test's own.

    A server started under it, and its data directory, are the test's to
    clean up: at the end, on every path (a failed assertion included), each
    process that still carries this TMPDIR is killed, and the directory goes.
    """
    with tempfile.TemporaryDirectory(prefix="broker-server-test-") as tmp:
        try:
            yield {**_without_neo4j_env(), "TMPDIR": tmp}
        finally:
            deadline = time.monotonic() + 30
            while (left := _started_with(tmp)) and time.monotonic() < deadline:
                for pid in left:  # a server is the leader of its own process group
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)


async def test_start_query_kill_restart_stop() -> None:
    cwd_before = set(os.listdir())
    server = EmbeddedServer().start()
    try:
        pid, port, root = server.pid, server.bolt_port, server.root
        assert pid is not None and _pid_alive(pid)
        assert await _query(server.uri, server.auth) == 42

        database = server.create_database()
        async with neo4j.AsyncGraphDatabase.driver(server.uri, auth=server.auth) as driver:
            await driver.execute_query("CREATE (:Kept {v: 7})", database_=database)

        server.kill()
        assert not _pid_alive(pid)
        with pytest.raises(ConnectionRefusedError):  # nothing listens any more
            await asyncio.open_connection("127.0.0.1", port)

        server.restart()
        assert server.bolt_port == port and server.root == root
        assert server.pid != pid
        async with neo4j.AsyncGraphDatabase.driver(server.uri, auth=server.auth) as driver:
            records, _, _ = await driver.execute_query(
                "MATCH (n:Kept) RETURN n.v AS v", database_=database
            )
        assert [r["v"] for r in records] == [7], "data written before kill -9 survives"
        await eventually(lambda: open_connections(port) == 0, what="driver sockets closed")
    finally:
        new_pid = server.pid
        server.stop()
    assert new_pid is not None and not _pid_alive(new_pid)
    assert not root.exists(), "stop() removes the temporary directory"
    assert set(os.listdir()) == cwd_before, "the server wrote files outside its directory"


async def test_wrong_password_and_unknown_database_are_real_errors(bolt_server: object) -> None:
    server = bolt_server
    assert hasattr(server, "uri")
    with pytest.raises(neo4j.exceptions.AuthError):
        await _query(server.uri, ("root", "not-the-password"))  # type: ignore[attr-defined]
    with pytest.raises(neo4j.exceptions.ClientError) as caught:
        await _query(server.uri, server.auth, database="no-such-db")  # type: ignore[attr-defined]
    assert caught.value.code == "Neo.ClientError.Database.DatabaseNotFound"


def test_password_never_in_repr_or_argv() -> None:
    with EmbeddedServer() as server:
        assert server.password not in repr(server)
        assert server.pid is not None
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert server.password not in argv


def kill_parent_of(server_class: str, *, whole_group: bool, grace: float) -> tuple[int, Path]:
    """Start ``server_class`` in a child Python and SIGKILL that child (with its
    whole process group if ``whole_group``); wait up to ``grace`` seconds for
    the server process and its temporary directory to go. Returns both.
    """
    script = textwrap.dedent(
        f"""
        import time
        from broker.testing import {server_class}
        server = {server_class}().start()
        print(server.pid, server.root, flush=True)
        time.sleep(600)
        """
    )
    with own_tmpdir() as env:
        parent = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=whole_group,
        )
        try:
            assert parent.stdout is not None
            pid, root = parent.stdout.readline().split()
            assert Path(root).exists()
        finally:
            if whole_group:
                os.killpg(parent.pid, signal.SIGKILL)
            else:
                parent.kill()
            parent.wait()
        deadline = time.monotonic() + grace
        while (_pid_alive(int(pid)) or Path(root).exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
    return int(pid), Path(root)


def test_parent_killed_leaves_nothing_behind() -> None:
    child_pid, root = kill_parent_of("EmbeddedServer", whole_group=True, grace=30)
    assert not _pid_alive(child_pid), "the server process outlived its parent"
    assert not root.exists(), "the temporary directory outlived its parent"


def test_neo4j_uri_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NEO4J_URI set, the fixtures use that server and start nothing."""
    with EmbeddedServer() as real:
        monkeypatch.setenv("NEO4J_URI", real.uri)
        monkeypatch.setenv("NEO4J_USERNAME", real.auth[0])
        monkeypatch.setenv("NEO4J_PASSWORD", real.auth[1])
        chosen, owned = select_server()
        assert isinstance(chosen, ExternalServer) and not owned
        assert chosen.uri == real.uri and chosen.auth == real.auth
        assert not chosen.supports_restart
        assert asyncio.run(_query(chosen.uri, chosen.auth)) == 42
        assert chosen.default_database == real.default_database
        # This server cannot CREATE DATABASE: the default one is handed out.
        assert chosen.create_database() == real.default_database
        chosen.stop()  # must not stop a server it did not start
        assert real.running
    monkeypatch.delenv("NEO4J_URI")
    assert server_from_env() is None


async def test_default_database_stays_put_as_databases_are_added(bolt_server: object) -> None:
    server = bolt_server
    # On Neo4j Community create_database() empties its one database instead.
    assert isinstance(server, EmbeddedServer | ExternalServer | Neo4jServer)
    for _ in range(5):
        server.create_database()
    async with neo4j.AsyncGraphDatabase.driver(server.uri, auth=server.auth) as driver:
        records, _, _ = await driver.execute_query(
            "SHOW DATABASES YIELD name, default", database_="system"
        )
        assert [r["name"] for r in records if r["default"]] == [server.default_database]
        marker = f"Where{os.getpid()}"
        await driver.execute_query(f"CREATE (:{marker})")  # names no database
        records, _, _ = await driver.execute_query(
            f"MATCH (n:{marker}) RETURN count(n) AS c", database_=server.default_database
        )
        assert records[0]["c"] == 1, "queries naming no database go to the default one"


# -- the command line: python -m broker.testing.server -----------------------------------

OPTIONS = ("--bolt-port", "--http-port", "--password", "--data-dir", "--database")


def _without_neo4j_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")}


def _run_help(command: list[str]) -> subprocess.CompletedProcess[str]:
    with own_tmpdir() as env:
        proc = subprocess.Popen(
            [*command, "--help"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=60)
        finally:  # a command line that ignored --help started a server: stop it all
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("how", ["module", "console script"])
def test_command_line_help(how: str) -> None:
    if how == "module":
        command = [sys.executable, "-m", "broker.testing.server"]
    else:
        command = [str(Path(sys.executable).with_name("neo4j-loop-broker-server"))]
    done = _run_help(command)
    assert done.returncode == 0, done.stderr
    for option in OPTIONS:
        assert option in done.stdout, done.stdout
    assert "NEO4J_PASSWORD" in done.stdout
    assert done.stderr == "", "no warning before the help"


def test_command_line_password_from_the_environment() -> None:
    options = server_module.parse_args(["--bolt-port", "7688"], {"NEO4J_PASSWORD": "from-env-pw"})
    assert options.password == "from-env-pw" and options.bolt_port == 7688
    options = server_module.parse_args(["--password", "given-pw"], {"NEO4J_PASSWORD": "from-env"})
    assert options.password == "given-pw"
    assert server_module.parse_args([], {}).password is None  # a random one
    with pytest.raises(SystemExit):
        server_module.parse_args(["--bolt-port", "76877"], {})


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def test_command_line_server_runs_until_sigterm() -> None:
    bolt, http = server_module._free_ports(2)
    password = "cli-password-8d2e"
    command = [sys.executable, "-m", "broker.testing.server", "--bolt-port", str(bolt)]
    command += ["--http-port", str(http), "--password", password, "--database", "clitest"]
    with own_tmpdir() as env:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            exported = {}
            for line in proc.stdout:  # the four lines come once the server answers
                name, _, value = line.strip().removeprefix("export ").partition("=")
                exported[name] = value
                if len(exported) == 4:
                    break
            assert exported == {
                "NEO4J_URI": f"bolt://127.0.0.1:{bolt}",
                "NEO4J_USERNAME": "root",
                "NEO4J_PASSWORD": password,
                "NEO4J_DATABASE": "clitest",
            }
            auth = (exported["NEO4J_USERNAME"], password)
            assert asyncio.run(_query(exported["NEO4J_URI"], auth, "clitest")) == 42
            [server_pid] = _children(proc.pid)

            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == 0, err
        assert "Warning" not in err, err
        assert not _pid_alive(server_pid), "the server process outlived the command"
        [data_dir] = re.findall(r"data directory: (\S+)", err)
        assert data_dir.startswith(env["TMPDIR"])
        assert not Path(data_dir).exists(), "the temporary directory outlived the command"
        assert not _port_answers(bolt) and not _port_answers(http)
