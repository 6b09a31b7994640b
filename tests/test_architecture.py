"""The package's layers: every import of a qlora module (function-local ones included) goes down a layer or
stays in its own, and no qlora modules import each other in a circle (README "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora

PACKAGE = Path(qlora.__file__).resolve().parent
# Bottom to top; a module may import its own layer and the ones before it. Top-level modules (the CLI of
# each command) and the demo's asset builders form the entry layer.
LAYERS = ("config", "data", "memory", "ops", "model", "training", "post", "entry")
MAX_TOP_LEVEL_FILES = 9  # __init__, cli and one module per command


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("qlora", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """qlora modules `path` imports anywhere in its body (`from qlora.x import y` counts y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name.startswith("qlora"):
                found.add(name)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if module == "qlora":
        return 0  # the package itself: a version string, imports nothing
    if len(parts) == 2 and parts[1] not in LAYERS or parts[1] == "demo":
        return LAYERS.index("entry")
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_every_import_goes_down_a_layer_or_stays_in_its_own():
    upward = [
        f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
        for module, targets in graph().items()
        for target in targets
        if layer(target) > layer(module) and not (target == "qlora" or module.startswith(target + "."))
    ]
    assert upward == []


def test_no_import_cycles():
    edges = {
        m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()
    }  # a package's own __init__ is no cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_top_level_holds_only_the_entry_points():
    files = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(files) <= MAX_TOP_LEVEL_FILES, files
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(LAYERS[:-1]) <= subpackages


def test_the_checker_sees_function_local_and_upward_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from qlora.training.run import train\n    import qlora.config.recipe\n")
    assert imports_of(probe, module_names()) == {"qlora.training.run", "qlora.config.recipe"}
    assert layer("qlora.config.recipe") < layer("qlora.training.run") < layer("qlora.train")
