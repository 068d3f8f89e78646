"""Layers point one way, and no module imports itself back (docs/architecture.md, "Layers").

Every import in every module counts, including imports inside functions: a cycle or a wrong
direction hidden in a function body is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fedkd": ROOT / "fedkd", "fedkd.strategies": ROOT / "strategies",
           "fedkd.simulations": ROOT / "simulations"}

LAYERS: dict[str, tuple[str, ...]] = {
    # Flower-free maths, settings, the wire protocol's keys, errors (fedkd.records: flwr.app only)
    "core": ("fedkd.atomic", "fedkd.errors", "fedkd.settings", "fedkd.settings_checks", "fedkd.protocol", "fedkd.records", "fedkd.losses",
             "fedkd.training", "fedkd.timing", "fedkd.optim", "fedkd.sampling", "fedkd.privacy", "fedkd.pate", "fedkd.client_dp",
             "fedkd.aggregation", "fedkd.models", "fedkd.data", "fedkd.reply_checks",
             "fedkd.faults", "fedkd.audit", "fedkd.dpsgd", "fedkd.dp_training", "fedkd.devices",
             "fedkd.compact", "fedkd.codecs", "fedkd.wire_codec", "fedkd.knowledge"),
    "server": ("fedkd.strategies", "fedkd.transfer", "fedkd.generators", "fedkd.server_distill",
               "fedkd.ensemble_distill",
               "fedkd.wire", "fedkd.wire_cache", "fedkd.reply_guard", "fedkd.server", "fedkd.checks"),
    "client": ("fedkd.client",),
    "app": ("fedkd.simulations", "fedkd.deploy", "fedkd.flower_compat", "fedkd.conf"),
}
ALLOWED = {"core": {"core"}, "server": {"core", "server"}, "client": {"core", "client"},
           "app": {"core", "server", "client", "app"}}
FLOWER_ALLOWED = {"core": (), "server": ("flwr.app", "flwr.serverapp"),
                  "client": ("flwr.app", "flwr.clientapp"), "app": ("flwr",)}
"""Which Flower packages each layer may import (`RECORD_MODULES`, in core, may import flwr.app)."""
RECORD_MODULES = ("fedkd.records", "fedkd.wire_codec")
"""Core modules that turn the protocol into `flwr.app` records (both sides use them)."""


def modules() -> dict[str, Path]:
    """Every fedkd module, by its installed name."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def layer_of(module: str) -> str:
    if module == "fedkd":
        return "app"  # the package facade (fedkd.run)
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and to "
                         "docs/architecture.md)")


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Names `module` imports anywhere in its file (function bodies included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_point_only_the_allowed_way():
    wrong = []
    for module, names in graph().items():
        layer = layer_of(module)
        for name in names:
            if name.startswith("fedkd"):
                if layer_of(name) not in ALLOWED[layer]:
                    wrong.append(f"{module} ({layer}) imports {name} ({layer_of(name)})")
            elif name.split(".")[0] == "flwr":
                allowed = ("flwr.app",) if module in RECORD_MODULES else FLOWER_ALLOWED[layer]
                if not any(name == a or name.startswith(a + ".") for a in allowed):
                    wrong.append(f"{module} ({layer}) imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, [["a"]]),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_a_wrong_direction_is_caught(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from fedkd.simulations.run import run\n")
    names = imports("fedkd.client.x", path, {"fedkd.simulations.run"})
    assert "fedkd.simulations.run" in names
    assert layer_of("fedkd.simulations.run") not in ALLOWED[layer_of("fedkd.client.x")]


def test_every_package_is_in_the_wheel():
    """A package missing from pyproject's list works in the checkout and is absent from the
    installed wheel (`.ci/run` installs the wheel)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {"fedkd": ROOT / "fedkd", **{name: ROOT / path
                                       for name, path in config["package-dir"].items()}}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if "__pycache__" not in parts and not any(p.startswith(".") for p in parts):
                found.add(".".join([name, *parts]))
    assert found - listed == set()
