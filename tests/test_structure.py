"""The package's import structure (docs/architecture.md): layers import downwards only, no module imports
another module's private (``_name``) helpers, no two modules import each other (directly or round a
longer loop), and no training recipe imports another recipe.

Read from the source with :mod:`ast` (no import runs), so a violation is found wherever the import sits,
inside a function included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastrl"
KERNELS = ROOT / "kernels"

# The training recipes: each reads top to bottom and shares code through the library modules only.
RECIPES = {"fastrl.train.sft", "fastrl.train.dpo", "fastrl.train.grpo", "fastrl.train.online_dpo",
           "fastrl.train.rm"}

# Layers, lowest first: a module may import its own layer and the layers below, never one above.
LAYERS = [
    ("fastrl.kernels", "fastrl._checks", "fastrl._extension", "fastrl._C"),
    ("fastrl.ops", "fastrl.sampling"),
    ("fastrl.losses",),
    ("fastrl.rollout",),
    ("fastrl.train",),
    ("fastrl.tasks", "fastrl.cli", "fastrl.info", "fastrl.__main__"),
]


def _module_name(path: pathlib.Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["fastrl", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["fastrl", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]
    return {_module_name(p): p for p in sorted(files)}


MODULES = _sources()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: pathlib.Path):
    """``(imported module, imported name or None, line)`` for every fastrl import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastrl"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, is_package, node)
            if not module.startswith("fastrl"):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES or sub == "fastrl._C":  # `from fastrl.train import distributed` imports a module
                    yield sub, None, node.lineno
                else:
                    yield module, alias.name, node.lineno


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _owner(module: str) -> str:
    """The module a name is defined in: the longest known module that prefixes it."""
    if module == "fastrl._C":  # the compiled extension
        return module
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module


def _graph():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, _, _ in _imports(name, path):
            target = _owner(module)
            if target and target != name:
                edges[name].add(target)
    return edges


def _layer(module: str) -> int:
    if module == "fastrl":  # the package's own __init__: the ops and the sampler
        return 1
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return len(LAYERS)


def test_the_walk_sees_the_package():
    # the checks below are only as good as the module list: the core modules must be in it
    for name in ("fastrl.losses.grpo", "fastrl.kernels.grpo_loss", "fastrl.train.config", "fastrl.rollout.generate"):
        assert name in MODULES
    assert any(t for t in _graph().values())


def test_no_cross_module_private_import():
    bad = []
    for name, path in MODULES.items():
        for module, imported, line in _imports(name, path):
            owner = _owner(module)
            private_module = any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:]
                                 if part not in ("_checks", "_extension", "_C"))
            if imported is not None and imported.startswith("_") and owner != name:
                bad.append(f"{_rel(path)}:{line} imports {imported} from {module}")
            elif private_module and not name.startswith(module.rpartition(".")[0]):
                bad.append(f"{_rel(path)}:{line} imports the private module {module}")
    assert not bad, "cross-module private imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = _graph()
    # Package __init__ files re-export their modules, so package -> module edges are expected and a
    # module importing its package's __init__ is what would close a loop: keep every edge.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] + [nxt]
                # a submodule importing its parent package only matters if the parent imports it back
                cycles.append(" -> ".join(loop))
            elif state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if state.get(node) is None:
            visit(node)
    # importing a parent package from its own submodule (e.g. fastrl.train.dpo -> fastrl.train) is
    # a cycle through the package __init__; it is reported like any other
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_import_downwards():
    bad = []
    for name, path in MODULES.items():
        for module, _, line in _imports(name, path):
            target = _owner(module)
            if target and _layer(target) > _layer(name):
                bad.append(f"{_rel(path)}:{line} ({name}) imports {target} from a layer above")
    assert not bad, "\n".join(bad)


def test_no_recipe_imports_another():
    bad = []
    for name in RECIPES & MODULES.keys():
        for module, _, line in _imports(name, MODULES[name]):
            target = _owner(module)
            if target in RECIPES and target != name:
                bad.append(f"{name}:{line} imports the recipe {target}")
    assert not bad, "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("source", ["fastrl/losses/grpo.py", "fastrl/train/grpo.py"])
def test_the_checks_would_fail(source, tmp_path, monkeypatch):
    # each check on a planted violation: a private import, an upward import, a cycle
    path = ROOT / source
    name = _module_name(path)
    planted = tmp_path / "planted.py"
    planted.write_text("from fastrl.tasks.t2i.pipeline import _private\n")
    monkeypatch.setitem(MODULES, name + "_planted", planted)
    with pytest.raises(AssertionError, match="_private"):
        test_no_cross_module_private_import()
    with pytest.raises(AssertionError, match="layer above"):
        test_layers_import_downwards()


@pytest.mark.slow
def test_architecture_states_the_files_a_grpo_step_passes_through():
    # docs/architecture.md states the count benchmarks/step_files.py measures; a change that moves the
    # step through more (or fewer) files must update the stated number
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    stated = re.search(r"A\s+GRPO step passes through \*\*(\d+) files\*\*", text)
    assert stated, "docs/architecture.md no longer states the count"
    from conftest import load_benchmark_script

    files = load_benchmark_script("step_files").step_files()
    assert "fastrl/train/grpo.py" in files and "fastrl/losses/grpo.py" in files  # the trace saw the step
    assert len(files) == int(stated.group(1)), files
