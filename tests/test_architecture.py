"""The package's import structure (docs/architecture.md): every module imports only from layers
below its own (or from its own package), counting imports placed inside functions, so there is no
cycle. A new top-level module or package must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.config import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"

# Lowest first. Names in one layer are independent of each other (no imports between them).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "log", "metric_names", "hub"),
    ("fsutil",),
    ("merge",),
    ("config",),
    ("configio",),
    ("manifest",),
    ("data",),
    ("evaluation", "training"),
    ("models", "release", "analysis", "quantize"),
    ("stages",),
    ("checks",),
    ("driver",),
    ("cluster",),
    ("__main__", "stage_main", "report", "analyze", "__init__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(module: str) -> str:
    """pipeline.stages.cpt -> stages; pipeline -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module ``path`` imports, at any depth in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("pipeline"):
                out.add(base)
                if base == "pipeline":  # from pipeline import metric_names
                    out.update(f"pipeline.{a.name}" for a in node.names)
    return out


def edges() -> list[tuple[str, str]]:
    return [(module_name(p), target) for p in sorted(PACKAGE.rglob("*.py")) for target in imported_modules(p)]


def test_every_module_has_a_layer():
    missing = sorted({top(module_name(p)) for p in PACKAGE.rglob("*.py")} - set(LAYER_OF))
    assert not missing, f"give these a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_imports_only_go_down():
    upward = []
    for source, target in edges():
        s, t = top(source), top(target)
        if target == "pipeline" or s == t:
            continue
        if s in LAYER_OF and LAYER_OF.get(t, -1) >= LAYER_OF[s]:
            upward.append(f"{source} imports {target} ({s}: layer {LAYER_OF[s]}, {t}: layer {LAYER_OF.get(t)})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for source, target in edges():
        while target not in modules and "." in target:  # `from pkg.mod import name` -> pkg.mod
            target = target.rpartition(".")[0]
        if target != source and target in modules and not source.startswith(target + "."):
            graph.setdefault(source, set()).add(target)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "active"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk finds imports inside functions and relative imports (so the tests above can fail)."""
    f = PACKAGE / "data" / "_probe_for_test.py"
    f.write_text("def f():\n    from pipeline.stages import cpt\n    from ..training import runner\n")
    try:
        found = imported_modules(f)
    finally:
        f.unlink()
    assert {"pipeline.stages", "pipeline.training"} <= found


def test_a_stage_registry_that_disagrees_with_config_stages_does_not_import():
    """pipeline/stages/__init__.py checks REGISTRY against config.STAGES with a raise that ``python -O``
    keeps (an assert would be dropped, and stage directories misnumbered)."""
    import subprocess
    import sys

    probe = "import pipeline.config as c; c.STAGES = c.STAGES[:-1]; import pipeline.stages"
    done = subprocess.run([sys.executable, "-O", "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr and "pipeline/config.py STAGES" in done.stderr, done.stderr
