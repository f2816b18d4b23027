"""Every Python block of README.md runs as written, against a real Bolt server.

Each block runs in a directory of its own, in a fresh interpreter, with
``NEO4J_URI``, ``NEO4J_USERNAME``, ``NEO4J_PASSWORD`` and ``NEO4J_DATABASE``
naming the test server:

- a block right after the line ``<!-- fragment -->`` is skipped, and no other;
- a block whose first line names a file (``# conftest.py``,
  ``# pyproject.toml``) is written to that file; consecutive named blocks
  share a directory, which pytest runs when it holds a ``test_*.py`` file
  (otherwise each of its Python files runs as a script);
- any other Python block runs as a script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.testing import BoltServer

README = Path(__file__).resolve().parent.parent / "README.md"
FRAGMENT = "<!-- fragment -->"
_FILE_NAME = re.compile(r"^#\s*([\w.-]+\.(?:py|toml|ini|cfg))\s*$")


@dataclass
class Block:
    line: int  # where its fence opens, counting from 1
    language: str
    text: str
    fragment: bool

    @property
    def file_name(self) -> str | None:
        first = self.text.split("\n", 1)[0]
        match = _FILE_NAME.match(first.strip())
        return match[1] if match else None


@dataclass
class Run:
    """One thing to run: a script, or a directory of named files."""

    line: int
    files: dict[str, str] = field(default_factory=dict)
    script: str | None = None

    @property
    def is_test_dir(self) -> bool:
        return any(re.fullmatch(r"test_\w*\.py", name) for name in self.files)


def blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    found: list[Block] = []
    lines = markdown.splitlines()
    previous = ""  # the last non-blank line before a fence
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if not fence:
            if line.strip():
                previous = line.strip()
            index += 1
            continue
        indent, marker, language = fence.groups()
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(marker):
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else "")
            index += 1
        start = index - len(body)
        found.append(Block(start, language.lower(), "\n".join(body) + "\n", previous == FRAGMENT))
        previous = ""
        index += 1
    return found


def runs(markdown: str) -> list[Run]:
    """What to run for a README: scripts and directories, fragments left out."""
    result: list[Run] = []
    group: Run | None = None
    for block in blocks(markdown):
        if block.fragment:
            continue
        name = block.file_name
        if name is None:
            if block.language == "python":
                group = None
                result.append(Run(block.line, script=block.text))
            continue
        if group is None or name in group.files:
            group = Run(block.line)
            result.append(group)
        group.files[name] = block.text
    return result


def test_blocks_are_found_and_fragments_skipped() -> None:
    text = "\n".join(
        [
            "```python",
            "print(1)",
            "```",
            FRAGMENT,
            "",
            "```python",
            "await fragment()",
            "```",
            "```toml",
            "# pyproject.toml",
            "[tool.pytest.ini_options]",
            "```",
            "text between",
            "```python",
            "# test_a.py",
            "def test_a(): pass",
            "```",
            "```sh",
            "make test",
            "```",
        ]
    )
    found = runs(text)
    assert [r.script for r in found] == ["print(1)\n", None]
    assert set(found[1].files) == {"pyproject.toml", "test_a.py"} and found[1].is_test_dir
    assert [b.fragment for b in blocks(text)] == [False, True, False, False, False]


RUNS = runs(README.read_text())


def _environment(server: BoltServer) -> dict[str, str]:
    username, password = server.auth
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "PYTEST_", "CELERY_"))
    }
    env.update(
        NEO4J_URI=server.uri,
        NEO4J_USERNAME=username,
        NEO4J_PASSWORD=password,
        NEO4J_DATABASE=server.default_database,
    )
    return env


def test_the_readme_has_python_to_run() -> None:
    assert sum(1 for r in RUNS if r.script is not None) >= 3
    assert any(r.is_test_dir for r in RUNS), "the testing example is missing"


def section_of(markdown: str, line: int) -> str:
    """The heading (``##`` or ``###``) a line of the README falls under."""
    heading = ""
    for text in markdown.splitlines()[:line]:
        if re.match(r"^#{2,3} ", text):
            heading = text.lstrip("#").strip()
    return heading


#: Sections a reader copies code from: each has a Python block that runs (not a fragment).
SECTIONS_WITH_CODE = (
    "Use",
    "Using it with Celery",
    "Which timeout bounds what",
    "Operating the pools",
    "Logs",
    "Metrics",
    "Testing your own code",
)


def test_every_section_with_code_has_a_block_that_runs() -> None:
    markdown = README.read_text()
    covered = {section_of(markdown, run.line) for run in RUNS}
    assert [name for name in SECTIONS_WITH_CODE if name not in covered] == []


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=[f"README.md:{r.line}" for r in RUNS])
def test_readme_block_runs(run: Run, bolt_server: BoltServer, tmp_path: Path) -> None:
    for name, text in run.files.items():
        (tmp_path / name).write_text(text)
    if run.script is not None:
        (tmp_path / "block.py").write_text(run.script)
        commands = [[sys.executable, "block.py"]]
    elif run.is_test_dir:
        commands = [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]]
    else:
        commands = [[sys.executable, name] for name in run.files if name.endswith(".py")]
    for command in commands:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=_environment(bolt_server),
            capture_output=True,
            text=True,
            timeout=180,
        )
        report = f"{' '.join(command[1:])} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, report
        assert "Traceback" not in done.stderr, report
        if run.is_test_dir:
            assert re.search(r"\b[1-9]\d* passed\b", done.stdout), report
            assert "warning" not in (done.stdout + done.stderr).lower(), report
