"""The house's rules, read from the source: three tiers with imports only downward, and no import cycle.

    groundwork/  the shared rules (errors, command-line runner, folders, hashing)   floor 0
    model/, data/  the model and the data pipeline, independent of each other         floor 1
    train/       the trainer                                                           floor 2
    toolbox/     the tools: export, evaluation, generation, plot, bench, planner       floor 3
Lazy imports inside functions count: they run up just the same.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"groundwork": 0, "model": 1, "data": 1, "train": 2, "toolbox": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in FLOORS for path in (ROOT / package).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (`from a import b` counts a.b when b is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {module for module in found if module in modules and module != name}


def test_imports_only_run_down_the_floors():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        floor, top = FLOORS[name.split(".")[0]], name.split(".")[0]
        for target in imports_of(name, path, modules):
            target_top = target.split(".")[0]
            if target_top != top and FLOORS[target_top] >= floor:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that run up or sideways: " + ", ".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str]:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target]
            if target not in state and (found := visit(target, [*trail, target])):
                return found
        state[name] = "done"
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return []


def test_no_import_cycle():
    modules = project_modules()
    cycle = find_cycle({name: imports_of(name, path, modules) for name, path in modules.items()})
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above would pass on a parser that sees nothing: make sure it sees a lazy upward import."""
    path = tmp_path / "prepare.py"
    path.write_text("def f():\n    from train.cli import run_main\n    from ..groundwork import folders\n")
    modules = {"data.prepare": path, "train.cli": path, "groundwork.folders": path, "groundwork": path}
    assert imports_of("data.prepare", path, modules) == {"train.cli", "groundwork.folders"}


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
