"""What an installer sees: the distribution's name, its extras, its command, its wheel."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "neo4j-loop-broker"


def test_pyproject_names_the_distribution_and_its_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == NAME
    extras = project["optional-dependencies"]
    assert any(dep.startswith("pytest-asyncio") for dep in extras["testing"])
    assert all(dep.split("[")[0] == NAME for dep in extras["dev"] if "[" in dep), (
        "the dev extra refers to the project by its own name"
    )
    assert project["scripts"] == {"neo4j-loop-broker-server": "broker.testing.server:main"}


def test_readme_installs_by_the_distribution_name() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {NAME}" in readme
    assert f"pip install '{NAME}[celery]'" in readme
    assert "pip install broker" not in readme and "`broker[" not in readme


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("broker.celery", "celery", "celery"),
        ("broker.celery_asyncio", "celery", "celery"),
        ("broker.prometheus", "prometheus_client", "prometheus"),
    ],
)
def test_missing_extra_names_the_install_line(
    module: str, missing: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [missing, *(n for n in sys.modules if n.startswith(f"{missing}."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install '{NAME}\[{extra}\]'"):
        importlib.import_module(module)


@pytest.mark.slow
def test_wheel_metadata(tmp_path: Path) -> None:
    """The wheel a ``pip install .`` builds: its name, extras, command and files."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("*.whl")
    assert wheel.name.startswith("neo4j_loop_broker-")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        info = next(n for n in files if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Name"] == NAME
    assert {"celery", "testing", "prometheus"} <= set(metadata.get_all("Provides-Extra") or [])
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("pytest-asyncio") and "testing" in r for r in requires), requires
    assert "neo4j-loop-broker-server = broker.testing.server:main" in entry_points
    for needed in ("broker/__init__.py", "broker/py.typed", "broker/testing/_arcadedb.py"):
        assert needed in files
    assert not [n for n in files if n.startswith(("tests/", "examples/"))]
