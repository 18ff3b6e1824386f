"""The package structure ``docs/architecture.md`` describes, checked: layers, no cycles, sizes, function length."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llavaseg"
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layers() -> list[set[str]]:
    layers = next(c for c in CONTRACTS if c["type"] == "layers")["layers"]
    return [{name.strip() for name in layer.split("|")} for layer in layers]


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_linter_contracts_are_kept(capsys) -> None:
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == EXIT_STATUS_SUCCESS, capsys.readouterr().out[-3000:]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("llavaseg", cache_dir=None)


def test_every_module_belongs_to_a_layer(graph) -> None:
    named = set().union(*_layers())
    modules = {m for m in graph.modules if m != "llavaseg" and not m.startswith(("llavaseg.default_prompts",
                                                                                 "llavaseg.shipped_adapters"))}
    orphans = sorted(m for m in modules if not any(m == n or m.startswith(n + ".") for n in named))
    assert orphans == []


def test_the_layer_check_catches_an_upward_import(graph) -> None:
    layers = _layers()
    assert graph.find_illegal_dependencies_for_layers(layers=layers) == set()
    graph.add_import(importer="llavaseg.models.presets", imported="llavaseg.routes.registry")  # a lower layer up
    try:
        illegal = graph.find_illegal_dependencies_for_layers(layers=layers)
    finally:
        graph.remove_import(importer="llavaseg.models.presets", imported="llavaseg.routes.registry")
    assert {(d.importer, d.imported) for d in illegal} == {("llavaseg.models", "llavaseg.routes")}


def test_no_package_holds_a_fifth_of_the_code() -> None:
    lines: Counter[str] = Counter()
    for path in _python_files():
        relative = path.relative_to(PACKAGE)
        lines[relative.parts[0] if len(relative.parts) > 1 else "(top-level modules)"] += len(
            path.read_text().splitlines())
    total = sum(lines.values())
    largest, count = lines.most_common(1)[0]
    assert count / total < 0.20, f"{largest} holds {count / total:.1%} of {total} lines"


def test_no_function_over_sixty_lines() -> None:
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
