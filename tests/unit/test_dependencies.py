"""The package's dependency direction, read from the source (every module-level and
function-local import of a pagedserve module, without importing anything):

    server > frontend > core > worker > layers/attention/models > leaf

A module may import its own layer or any lower one, never a higher one, and the module
import graph has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "pagedserve"

# Highest first; a module belongs to the first layer with a matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("server", ("pagedserve.server", "pagedserve.entrypoints", "pagedserve.cli", "pagedserve.bench")),
    # `pagedserve` itself is the public face of the offline API: it re-exports LLM.
    ("frontend", ("pagedserve.frontend", "pagedserve.llm", "pagedserve.engine_args", "pagedserve")),
    ("core", ("pagedserve.core",)),
    ("worker", ("pagedserve.worker",)),
    ("model", ("pagedserve.layers", "pagedserve.attention", "pagedserve.models")),
    ("leaf", ("pagedserve.config", "pagedserve.errors", "pagedserve.logger", "pagedserve.sampling_params",
              "pagedserve.lora_request",
              "pagedserve.outputs", "pagedserve.engine_io")),
]
RANK = {name: rank for rank, (name, _) in enumerate(reversed(LAYERS))}   # leaf 0 .. server 5


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "pagedserve" and module != "pagedserve":
                continue   # only the package's own __init__
            if module == prefix or module.startswith(prefix + "."):
                return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def all_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The pagedserve modules `module` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                package = module.split(".")
                package = package[:len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:   # `import pagedserve.a.b.c` where c is an attribute
                name = name.rpartition(".")[0]
            if name.startswith("pagedserve") and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {module: imports_of(module, path, known) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if RANK[layer_of(target)] > RANK[layer_of(module)]:
                upward.append(f"{module} ({layer_of(module)}) -> {target} ({layer_of(target)})")
    assert not upward, "imports against the dependency direction:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph, cycles = import_graph(), []
    while (cycle := find_cycle(graph)) is not None:   # every cycle, each reported once
        cycles.append(" -> ".join(cycle))
        graph[cycle[0]].discard(cycle[1])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The walk finds imports inside functions and resolves `from . import x`."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from pagedserve.core import scheduler\n    from . import block_pool\n")
    known = {"pagedserve.core", "pagedserve.core.scheduler", "pagedserve.core.block_pool", "pagedserve.core.mod"}
    assert imports_of("pagedserve.core.mod", source, known) == {"pagedserve.core.scheduler",
                                                               "pagedserve.core.block_pool"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
