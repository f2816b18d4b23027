"""A Neo4j Community DBMS for tests, built once with Maven and kept in a cache.

Neo4j publishes its whole Community DBMS as a library (``org.neo4j:neo4j``).
:func:`ensure_build` resolves it with ``mvn dependency:copy-dependencies`` on
a generated POM and compiles the project's small launcher
(``broker/testing/java/Neo4jLauncher.java``) with ``javac``. The result lives
outside the repository, in ``$XDG_CACHE_HOME/neo4j-loop-broker/neo4j-VERSION``
(``~/.cache`` by default, ``BROKER_NEO4J_CACHE`` to move it). A file lock
serializes concurrent first builds; later uses only check that it is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CURRENT_VERSION",
    "LTS_VERSION",
    "Neo4jBuild",
    "Neo4jBuildError",
    "ensure_build",
    "find_java",
    "java_major",
    "resolve_version",
]

#: The long-term support line, which runs on Java 17.
LTS_VERSION = "5.26.30"
#: The current calendar release, which needs Java 21 or later.
CURRENT_VERSION = "2026.08.1"
_ALIASES = {"lts": LTS_VERSION, "5.26": LTS_VERSION, "current": CURRENT_VERSION}
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_LAUNCHER = Path(__file__).with_name("java") / "Neo4jLauncher.java"
_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>neo4j-loop-broker</groupId>
  <artifactId>neo4j-test-server</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.neo4j</groupId>
      <artifactId>neo4j</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


class Neo4jBuildError(RuntimeError):
    """Neo4j could not be built: a tool is missing or the registry refused."""


@dataclass(frozen=True)
class Neo4jBuild:
    """A resolved Neo4j with the compiled launcher, ready to run."""

    version: str
    java: Path
    lib: Path
    classes: Path

    @property
    def classpath(self) -> str:
        return f"{self.classes}{os.pathsep}{self.lib / '*'}"


def resolve_version(version: str | None = None) -> str:
    """The version to run: the one given, ``BROKER_TEST_NEO4J_VERSION``, or the LTS."""
    chosen = version or os.environ.get("BROKER_TEST_NEO4J_VERSION") or LTS_VERSION
    chosen = _ALIASES.get(chosen.lower(), chosen)
    if not _VERSION.match(chosen):
        raise ValueError(
            f"Neo4j version {chosen!r} is not of the form X.Y.Z "
            f"(or one of {', '.join(sorted(_ALIASES))})"
        )
    return chosen


def needed_java(version: str) -> int:
    """The oldest Java that a Neo4j version runs on."""
    return 17 if int(version.split(".")[0]) < 2025 else 21


def find_java(java: str | os.PathLike[str] | None = None) -> Path:
    """The ``java`` to use: the one given, ``$JAVA_HOME/bin/java``, or the one on PATH."""
    if java is not None:
        path = Path(java)
    elif os.environ.get("JAVA_HOME"):
        path = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
    else:
        found = shutil.which("java")
        if found is None:
            raise Neo4jBuildError(
                "no 'java' found: Neo4j needs a JDK (17 for Neo4j 5.26, 21 or later for "
                "2025.x and newer); install one (Debian: apt-get install openjdk-17-jdk-headless) "
                "or set JAVA_HOME"
            )
        path = Path(found)
    if not os.access(path, os.X_OK):
        raise Neo4jBuildError(f"{path} is not an executable java; install a JDK or fix JAVA_HOME")
    return path.resolve()


def java_major(java: Path) -> int:
    """The major version of a ``java`` binary (17, 21, 25 ...)."""
    try:
        done = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        raise Neo4jBuildError(f"{java} does not run: {exc}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr)
    if match is None:
        raise Neo4jBuildError(f"cannot tell the version of {java}: {done.stderr.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def cache_root() -> Path:
    """Where builds are kept, outside any checkout."""
    if os.environ.get("BROKER_NEO4J_CACHE"):
        return Path(os.environ["BROKER_NEO4J_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neo4j-loop-broker"


def ensure_build(
    version: str | None = None, *, java: str | os.PathLike[str] | None = None
) -> Neo4jBuild:
    """Resolve Neo4j ``version`` and compile the launcher, unless already cached."""
    version = resolve_version(version)
    java_path = find_java(java)
    major = java_major(java_path)
    if major < needed_java(version):
        raise Neo4jBuildError(
            f"Neo4j {version} needs Java {needed_java(version)} or later, and {java_path} is "
            f"Java {major}: set JAVA_HOME to a newer JDK (or pass java=...)"
        )
    home = cache_root() / f"neo4j-{version}"
    home.parent.mkdir(parents=True, exist_ok=True)
    with _locked(home.with_name(home.name + ".lock")):
        lib = home / "lib"
        if not (home / "resolved").exists():
            _resolve(version, home)
        classes = _compile(java_path, lib, home, needed_java(version))
    return Neo4jBuild(version=version, java=java_path, lib=lib, classes=classes)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tool(name: str, java: Path | None = None) -> str:
    if java is not None and (java.parent / name).exists():
        return str(java.parent / name)
    found = shutil.which(name)
    if found is None:
        what = {
            "mvn": "Maven (Debian: apt-get install maven)",
            "javac": "a JDK, not only a JRE (Debian: apt-get install openjdk-17-jdk-headless)",
        }[name]
        raise Neo4jBuildError(f"no '{name}' found: building the Neo4j test server needs {what}")
    return found


def _resolve(version: str, home: Path) -> None:
    """Copy ``org.neo4j:neo4j:version`` and all it needs into ``home/lib``."""
    mvn = _tool("mvn")
    shutil.rmtree(home, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=home.name + ".", dir=home.parent))
    try:
        (work / "pom.xml").write_text(_POM.format(version=version))
        try:
            done = subprocess.run(
                [mvn, "-B", "-q", "dependency:copy-dependencies", "-DoutputDirectory=lib"],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Neo4jBuildError(
                f"Maven took more than 15 minutes to resolve org.neo4j:neo4j:{version}; "
                "check that the Maven registry can be reached"
            ) from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise Neo4jBuildError(
                f"Maven could not resolve org.neo4j:neo4j:{version} (is the version right, and "
                f"can the Maven registry be reached?); its output ends with:\n{tail}"
            )
        (work / "resolved").write_text(version + "\n")
        work.rename(home)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compile(java: Path, lib: Path, home: Path, release: int) -> Path:
    """The launcher compiled for this build, in a directory named by its source's hash."""
    source = _LAUNCHER.read_bytes()
    classes = home / f"launcher-{hashlib.sha256(source).hexdigest()[:12]}"
    if (classes / "Neo4jLauncher.class").exists():
        return classes
    work = Path(tempfile.mkdtemp(prefix="launcher.", dir=home))
    try:
        # Compiled for the oldest Java the version runs on, so any newer JDK runs it too.
        javac = _tool("javac", java)
        jars = str(lib / "*")
        done = subprocess.run(
            [javac, "--release", str(release), "-d", str(work), "-cp", jars, str(_LAUNCHER)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise Neo4jBuildError(f"javac could not compile the launcher:\n{done.stderr[-2000:]}")
        shutil.rmtree(classes, ignore_errors=True)
        work.rename(classes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return classes
