"""The layout is the architecture: imports run one way only, and no modules import each
other in a circle. Read from the source with ``ast`` (every import statement, also those
inside functions), so a test in the suite keeps what the README's layout table says.

From the top down (a module may import its own layer and the ones below):

  simagent_lab     the lab: fake modem, its pytest plugin, demo, local runners
  agent.cli, agent.platform   the technician's and the platform team's commands
  agent.service    the daemon and its services
  agent.core       rules and records: binding, gate, tokens, evidence, store, time, config, facts
  at_commands      the modem: AT protocol, vocabulary, profiles, client, discovery
  agent, agent.exitcodes    the package's face (version, exit codes): anyone
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("at_commands", "agent.core", "agent.service", ("agent.cli", "agent.platform"), "simagent_lab")
BASE = {"agent", "agent.exitcodes", "agent.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in ("agent", "at_commands", "simagent_lab"):
        for path in (ROOT / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


MODULES = modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from pkg import mod` names the module; `from pkg import name` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int | None:
    if name in BASE:
        return None
    for index, prefixes in reversed(list(enumerate(LAYERS))):
        for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
            if name == prefix or name.startswith(prefix + "."):
                return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS or BASE")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_only(name):
    own = layer(name)
    upward = sorted(t for t in GRAPH[name] if own is not None and layer(t) is not None and layer(t) > own)
    assert not upward, f"{name} ({LAYERS[own]}) imports from a higher layer: {upward}"


def test_the_base_imports_nothing_of_the_layers():
    for name in BASE & MODULES.keys():
        if name == "agent.__main__":
            continue
        assert all(layer(t) is None for t in GRAPH[name]), (name, GRAPH[name])


def test_no_import_circles():
    """Tarjan's strongly connected components over the module graph: none has two members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The reader is not vacuous: it finds the imports it must forbid."""
    assert "agent.core.store" in GRAPH["agent.core.binding"]
    assert "at_commands.profiles" in GRAPH["at_commands.protocol"]  # a relative import
    assert "agent.service.daemon" not in GRAPH["agent.core.facts"]
