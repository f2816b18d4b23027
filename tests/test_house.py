"""The house rules of ``broker/``, checked: sizes, imports, and private names.

Each rule keeps the package easy to change: small modules and functions, no
import circles (type-only ones included), asyncio's and janus's private
names read in one module each, and few reads of another module's or
object's private names, each of them commented.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "broker"
MODULES = sorted(p for p in PACKAGE.glob("*.py"))  # broker/testing apart

#: Reads of another module's or object's private names allowed in broker/,
#: outside the one module that holds every read of asyncio's (where each
#: read is commented too).
MAX_PRIVATE_READS = 8
#: namedtuple's public methods start with an underscore.
_PUBLIC = frozenset({"_replace", "_asdict", "_fields", "_make"})


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path) -> str:
    return "broker" if path.stem == "__init__" else f"broker.{path.stem}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_is_over_500_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 500


def test_no_function_is_over_50_lines() -> None:
    long: list[str] = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 50:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert long == []


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, type-only imports included."""
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "broker":
                found.update(f"broker.{alias.name}" for alias in node.names)
            elif node.module.startswith("broker."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("broker."))
    return {name for name in found if not name.startswith("broker.testing")}


def test_no_import_circle() -> None:
    graph = {_module_name(p): _imports(p) for p in MODULES}
    circles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target in graph and len(path) < len(graph):
                visit(target, [*path, target])

    for module in graph:
        if module != "broker":  # the package's own __init__ re-exports everything
            visit(module, [module])
    assert circles == []


def _private_reads(path: Path) -> list[tuple[int, str]]:
    """Attributes named ``_x`` read on anything but ``self``/``cls``, and private imports."""
    reads: list[tuple[int, str]] = []
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.Attribute)
            and re.fullmatch(r"_[A-Za-z][A-Za-z0-9_]*", node.attr)
            and node.attr not in _PUBLIC
        ):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
                continue
            reads.append((node.lineno, node.attr))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
            and not str(node.args[1].value).endswith("__")  # a dunder is public protocol
        ):
            reads.append((node.lineno, str(node.args[1].value)))
    return reads


def test_private_names_of_others_are_few_and_each_commented() -> None:
    reads: list[str] = []
    uncommented: list[str] = []
    for path in MODULES:
        lines = path.read_text().splitlines()
        for lineno, name in _private_reads(path):
            if path.name != "asyncio_internals.py":
                reads.append(f"{path.name}:{lineno} {name}")
            around = " ".join(lines[max(0, lineno - 3) : lineno])
            if "#" not in around and '"""' not in around:
                uncommented.append(f"{path.name}:{lineno} {name}")
    assert len(reads) <= MAX_PRIVATE_READS, reads
    assert uncommented == []


_ASYNCIO = frozenset(
    {"_get_running_loop", "_asyncgens_shutdown_called", "_thread_id", "_selector", "_ssock"}
)


def test_asyncio_and_janus_private_names_live_in_one_module_each() -> None:
    asyncio_users, janus_users = set(), set()
    for path in MODULES:
        names = {name for _, name in _private_reads(path)}
        text = path.read_text()
        if re.search(r"asyncio\._[a-z]|selector_events\._", text) or names & _ASYNCIO:
            asyncio_users.add(path.name)
        if "_sync_mutex" in names:
            janus_users.add(path.name)
    assert asyncio_users == {"asyncio_internals.py"}
    assert janus_users == {"mailbox.py"}
