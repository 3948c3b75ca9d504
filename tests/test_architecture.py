"""The package's layers import only downward, the import graph has no circle, and no module
reaches another of the package from inside a function unless that module pulls in an optional
dependency (megatron-core, triton) when imported. See docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nvfp4_dist"

# Bottom to top; a module belongs to the layer of the longest prefix that names it. Keep this
# table and docs/ARCHITECTURE.md in step.
LAYERS = (
    ("foundation", ("nvfp4_dist._version", "nvfp4_dist.errors", "nvfp4_dist.progress")),
    ("numerics", ("nvfp4_dist.numerics",)),
    ("kernels", ("nvfp4_dist.kernels",)),
    ("layout", ("nvfp4_dist.layout", "nvfp4_dist.config")),
    ("parallel", ("nvfp4_dist.parallel",)),
    ("calib", ("nvfp4_dist.calib",)),
    ("export", ("nvfp4_dist.export",)),
    ("entry points", ("nvfp4_dist.integrations", "nvfp4_dist.models", "nvfp4_dist.launch",
                      "nvfp4_dist.runs", "nvfp4_dist.inputs", "nvfp4_dist.cli", "nvfp4_dist.__main__", "nvfp4_dist")),
)
OPTIONAL_DEPENDENCIES = ("megatron", "triton")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return layer


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str):
    """(target module, node, at module level) of every nvfp4_dist import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(node) for node in tree.body}
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nvfp4_dist":
                    yield alias.name, node, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "nvfp4_dist":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                target = f"{source}.{alias.name}"
                yield (target if target in MODULES else source), node, id(node) in top_level


def _imports_optional_dependency(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing ``module`` imports megatron-core or triton (itself, or through the
    package modules it imports at module level)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n.split(".")[0] in OPTIONAL_DEPENDENCIES for n in names):
            return True
    return any(_imports_optional_dependency(t, seen | {module}) for t, _, top in _imports(module)
               if top and t not in seen and t != module)


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_layers_import_only_downward():
    upward = []
    for module in MODULES:
        for target, node, _ in _imports(module):
            assert target in MODULES, f"{module}:{node.lineno} imports {target}, which does not exist"
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{node.lineno} ({LAYERS[layer_of(module)][0]}) imports "
                              f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)


def test_function_level_imports_only_load_optional_dependencies():
    hidden = [f"{module}:{node.lineno} imports {target} inside a function"
              for module in MODULES for target, node, top in _imports(module)
              if not top and not _imports_optional_dependency(target)]
    assert not hidden, ("function-level imports of the package's own modules (move them to the top; "
                        "a circle they dodge is a layering fault):\n  " + "\n  ".join(hidden))


def test_module_imports_have_no_circle():
    graph = {m: sorted({t for t, _, top in _imports(m) if top and t != m}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The layering check is not vacuous: a kernel module importing calib is caught."""
    fake = tmp_path / "nvfp4_dist" / "kernels" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..calib import pipeline\n")
    monkeypatch.setitem(MODULES, "nvfp4_dist.kernels.bad", fake)
    with pytest.raises(AssertionError, match=r"nvfp4_dist.kernels.bad:1 \(kernels\) imports "
                                             r"nvfp4_dist.calib.pipeline \(calib\)"):
        test_layers_import_only_downward()
