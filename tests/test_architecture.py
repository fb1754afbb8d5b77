"""The shape of the package, held by a test: features meet only in the trainer, through
the protocol, and no module imports itself through others (no import circle).

Imports are read from the source (``ast``), at runtime level: everything except what is
under ``if TYPE_CHECKING:``. An import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hardtrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(name: str) -> set[str]:
    """The hardtrain modules ``name`` imports when it runs."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: runtime_imports(name) for name in MODULES}
FEATURES = sorted(m for m in MODULES if m.startswith("hardtrain._features."))


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (circle := walk(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (circle := walk(start)):
            return circle
    return None


def test_the_reader_sees_imports() -> None:
    """The checks below mean something: the graph holds the edges everyone knows of."""
    assert "hardtrain._loop.protocol" in GRAPH["hardtrain._features.nan"]
    assert "hardtrain._features.nan" in GRAPH["hardtrain.trainer"]
    assert "hardtrain.checkpoint._policy" in GRAPH["hardtrain.trainer"]
    assert len(FEATURES) >= 5


@pytest.mark.parametrize("feature", FEATURES)
def test_a_feature_imports_no_other_feature_and_not_the_trainer(feature: str) -> None:
    banned = {m for m in MODULES
              if (m.startswith("hardtrain._features.") and m != feature)
              or m in ("hardtrain.trainer", "hardtrain")}
    assert not GRAPH[feature] & banned, f"{feature} imports {sorted(GRAPH[feature] & banned)}"


def test_the_loop_imports_no_feature() -> None:
    for name in MODULES:
        if name.startswith("hardtrain._loop"):
            bad = {m for m in GRAPH[name]
                   if m.startswith("hardtrain._features") or m == "hardtrain.trainer"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_only_dist_talks_to_torch_distributed_groups() -> None:
    for name, path in MODULES.items():
        if name != "hardtrain._dist":
            text = path.read_text()
            for call in ("new_group(", "destroy_process_group(", "init_process_group("):
                assert call not in text, f"{name} calls {call}: ask hardtrain._dist.groups"


def test_no_import_circle() -> None:
    assert find_circle(GRAPH) is None, " -> ".join(find_circle(GRAPH) or [])


def test_the_circle_finder_finds_one() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
