"""The library's layers, read off its imports (every import statement, function-local ones too, parsed
with ast; nothing is imported to check): no cycles, each module importing only from its own layer or
those below it, the ops from the backend, dtypes and each other only, the model nothing of the
runtime, and nothing but the CLI importing the CLI."""
import ast
import os

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "npllama")

# Lowest first; a module may import modules of its own layer or lower ones. The package's __init__
# (the public API) sits above them all and is left out.
LAYERS = [
    ["npllama.errors", "npllama.dtypes", "npllama.backend", "npllama.config"],
    ["npllama.ops"],
    ["npllama.adapters", "npllama.runtime"],
    ["npllama.io"],
    ["npllama.model", "npllama.adamw", "npllama.zero", "npllama.data", "npllama.sampling"],
    ["npllama.generation", "npllama.conversation", "npllama.train", "npllama.classify"],
    ["npllama.cli"],
]


def module_names():
    """Dotted name -> file path of every module in the package."""
    names = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(directory, file), ROOT)[:-len(".py")].split(os.sep)
                names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(directory, file)
    return names


def imports_of(name, path, modules):
    """The package's modules that a module imports (relative imports resolved; `from . import x`
    counts as importing module x when x is one)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from P import x`: module P.x when there is one, else P's x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


@pytest.fixture(scope="module")
def graph():
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """A list of modules forming an import cycle, or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None
    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def layer(module):
    for rank, members in enumerate(LAYERS):
        if any(module == member or module.startswith(member + ".") for member in members):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_the_checks_see_what_they_check(graph):
    """The parser finds known imports, function-local ones included, and the cycle finder finds cycles."""
    assert "npllama.ops.linear" in graph["npllama.model"] and "npllama.backend" in graph["npllama.ops.linear"]
    assert "npllama.cli.train" in graph["npllama.cli"]  # `from . import classify, generate, models, train`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles(graph):
    cycle = find_cycle({name: targets for name, targets in graph.items() if name != "npllama"})
    assert cycle is None, " -> ".join(cycle)


def test_modules_import_only_their_layer_and_those_below(graph):
    for module, targets in graph.items():
        if module == "npllama":
            continue
        above = sorted(target for target in targets if target != "npllama" and layer(target) > layer(module))
        assert not above, f"{module} (layer {layer(module)}) imports {above} from a layer above"


def test_ops_import_only_the_backend_dtypes_and_ops(graph):
    allowed = {"npllama.backend", "npllama.dtypes", "npllama.errors"}
    for module, targets in graph.items():
        if module.startswith("npllama.ops"):
            assert targets <= allowed | {t for t in targets if t.startswith("npllama.ops")}, (module, targets)


def test_the_model_is_one_process_math(graph):
    assert not any(target.startswith("npllama.runtime") for target in graph["npllama.model"])


def test_generation_runs_the_model_not_the_ops(graph):
    assert not any(target.startswith("npllama.ops") for target in graph["npllama.generation"])


def test_only_the_cli_imports_the_cli(graph):
    for module, targets in graph.items():
        if not module.startswith("npllama.cli"):
            assert not any(target.startswith("npllama.cli") for target in targets), module
