"""The Neo4j test service: its build's errors, its command line, its clean-up.

The error paths need no Neo4j and run everywhere (some need ``java`` or
``mvn`` on the machine, and say so when skipped). The rest starts a real
Neo4j and runs when the suite runs against Neo4j (``BROKER_TEST_SERVER=neo4j``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import neo4j
import pytest

from broker.testing import Neo4jServer, server_kind
from broker.testing.neo4j_build import (
    CURRENT_VERSION,
    LTS_VERSION,
    Neo4jBuildError,
    ensure_build,
    java_major,
    resolve_version,
)
from tests.test_server import _children, _pid_alive, kill_parent_of, own_tmpdir

needs_neo4j = pytest.mark.skipif(
    server_kind() != "neo4j", reason="starts Neo4j: run with BROKER_TEST_SERVER=neo4j"
)


def _leftover_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("broker-neo4j-*")}


def test_version_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_TEST_NEO4J_VERSION", raising=False)
    assert resolve_version() == LTS_VERSION and LTS_VERSION.startswith("5.26.")
    assert resolve_version("current") == CURRENT_VERSION
    assert resolve_version("LTS") == LTS_VERSION
    monkeypatch.setenv("BROKER_TEST_NEO4J_VERSION", "2026.01.0")
    assert resolve_version() == "2026.01.0"
    assert resolve_version("5.26.1") == "5.26.1", "the argument wins over the environment"
    with pytest.raises(ValueError, match=r"X\.Y\.Z"):
        resolve_version("5.26.0; rm -rf /")


def test_extra_settings_reach_neo4j_conf_as_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_alive = "server.bolt.connection_keep_alive_for_requests"
    monkeypatch.setenv("BROKER_TEST_NEO4J_SETTINGS", f" {keep_alive}=STREAMING ;")

    def conf(server: Neo4jServer) -> list[str]:
        server._port = 7687  # as if started: the file names the port
        return server._settings().splitlines()

    assert f"{keep_alive}=STREAMING" in conf(Neo4jServer())
    given = conf(Neo4jServer(settings={keep_alive: "OFF"}))
    assert f"{keep_alive}=OFF" in given and f"{keep_alive}=STREAMING" not in given
    with pytest.raises(ValueError, match="plain Neo4j setting"):
        Neo4jServer(settings={keep_alive: "ALL\ndbms.security.auth_enabled=false"})
    monkeypatch.setenv("BROKER_TEST_NEO4J_SETTINGS", "no-equals-sign")
    with pytest.raises(ValueError, match="name=value"):
        Neo4jServer()


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = _leftover_dirs()
    with pytest.raises(Neo4jBuildError, match=r"not an executable java; install a JDK"):
        Neo4jServer(java=tmp_path / "java").start()
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Neo4jBuildError, match=r"no 'java' found: Neo4j needs a JDK"):
        Neo4jServer().start()
    assert _leftover_dirs() == before, "a failed start left a temporary directory"


def _java() -> Path:
    found = shutil.which("java")
    if found is None:
        pytest.skip("needs java on PATH")
    return Path(found).resolve()


def test_current_release_refuses_an_old_java() -> None:
    java = _java()
    if java_major(java) >= 21:
        pytest.skip(f"the java on PATH is {java_major(java)}, new enough for every release")
    with pytest.raises(Neo4jBuildError, match=r"needs Java 21 or later.*set JAVA_HOME"):
        ensure_build("current", java=java)


def test_missing_maven_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    java = _java()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("BROKER_NEO4J_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Neo4jBuildError, match=r"no 'mvn' found.*needs Maven"):
        ensure_build(LTS_VERSION)


def test_no_registry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Maven offline with an empty local repository: as with no registry at all."""
    _java()
    if shutil.which("mvn") is None:
        pytest.skip("needs mvn on PATH")
    home = tmp_path / "home"
    (home / ".m2").mkdir(parents=True)
    (home / ".m2" / "settings.xml").write_text("<settings><offline>true</offline></settings>")
    monkeypatch.setenv("MAVEN_OPTS", f"-Duser.home={home}")
    monkeypatch.setenv("BROKER_NEO4J_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Neo4jBuildError, match=r"Maven could not resolve org.neo4j:neo4j:5\.26"):
        ensure_build(LTS_VERSION)
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == [], "a failed build left files in the cache"


def test_command_line_error_without_java() -> None:
    command = [sys.executable, "-m", "broker.testing.server", "--server", "neo4j"]
    with own_tmpdir() as env:
        done = subprocess.run(
            [*command, "--java", "/nonexistent/java"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert "error: /nonexistent/java is not an executable java; install a JDK" in done.stderr
        assert done.stdout == "", "no settings printed for a server that never started"
        assert os.listdir(env["TMPDIR"]) == []


# -- a real Neo4j -------------------------------------------------------------------------


async def _query(uri: str, auth: tuple[str, str]) -> int:
    async with neo4j.AsyncGraphDatabase.driver(uri, auth=auth) as driver:
        records, _, _ = await driver.execute_query("RETURN 41 + 1 AS x")
        return int(records[0]["x"])


@needs_neo4j
def test_command_line_runs_neo4j_until_sigterm() -> None:
    password = "cli-password-5c1a"
    command = [sys.executable, "-m", "broker.testing.server", "--server", "neo4j"]
    with own_tmpdir() as env:
        env["NEO4J_PASSWORD"] = password
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            exported = {}
            for line in proc.stdout:
                name, _, value = line.strip().removeprefix("export ").partition("=")
                exported[name] = value
                if len(exported) == 4:
                    break
            assert exported["NEO4J_USERNAME"] == "neo4j"
            assert exported["NEO4J_DATABASE"] == "neo4j"
            assert exported["NEO4J_PASSWORD"] == password
            assert asyncio.run(_query(exported["NEO4J_URI"], ("neo4j", password))) == 42
            [jvm] = _children(proc.pid)
            assert password not in Path(f"/proc/{jvm}/cmdline").read_text()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        assert proc.returncode == 0, err
        assert f"Starting the Neo4j {resolve_version()} server" in err
        assert not _pid_alive(jvm), "the JVM outlived the command"
        assert os.listdir(env["TMPDIR"]) == [], "the data directory outlived the command"


@needs_neo4j
def test_parent_killed_leaves_no_jvm_behind() -> None:
    """Only the parent is killed: the JVM notices and goes by itself."""
    jvm, root = kill_parent_of("Neo4jServer", whole_group=False, grace=60)
    assert not _pid_alive(jvm), "the JVM outlived its parent"
    assert not root.exists(), "the temporary directory outlived its parent"


@needs_neo4j
def test_kept_directory_restarts_with_its_password(tmp_path: Path) -> None:
    """The password is set on the first start; a second start over the same data finds it."""
    first = Neo4jServer(root=tmp_path / "kept", password="kept-password-1")
    with first:
        with neo4j.GraphDatabase.driver(first.uri, auth=first.auth) as driver:
            driver.execute_query("CREATE (:Kept {n: 7})")
        jvm = first.pid
        assert jvm is not None
        assert "kept-password-1" not in Path(f"/proc/{jvm}/cmdline").read_text()
    assert not _pid_alive(jvm), "stop() left the JVM running"
    with Neo4jServer(root=tmp_path / "kept", password="kept-password-1") as again:
        with neo4j.GraphDatabase.driver(again.uri, auth=again.auth) as driver:
            records, _, _ = driver.execute_query("MATCH (k:Kept) RETURN k.n AS n")
        assert [r["n"] for r in records] == [7]
    assert "the password was set before" in (tmp_path / "kept" / "server.log").read_text()
