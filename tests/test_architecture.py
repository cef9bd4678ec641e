"""The package's folders are the pipeline, and imports only flow forward along it.

load → calibrate → transform → quantize → export → validate → build engine is laid out as
ops/ (op contracts and kernels) < models/ < load/ < quant/ < export/ < runtime/ < api.py (one
function per stage) < commands/ (the CLI, built on the API); the other top-level modules are the
foundation every stage may use (errors, evaluate, checks, _version) or the package's entry points
(__init__, __main__).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mq_export"
FOUNDATION = {"errors", "evaluate", "checks", "_version"}
FACADE = {"__init__", "__main__"}
STAGES = ["ops", "models", "load", "quant", "export", "runtime", "api", "commands"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def rank(module: str) -> int:
    top = module.split(".")[0]
    if top in FOUNDATION:
        return 0
    if top in FACADE:
        return len(STAGES) + 1
    return STAGES.index(top) + 1


def imports_of(path: Path) -> set[str]:
    """mq_export modules imported anywhere in the file (including imports inside functions)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("mq_export"):
                target = node.module[len("mq_export."):] if node.module != "mq_export" else ""
            else:
                continue
            for alias in node.names:   # `from . import x` may name a module
                candidate = f"{target}.{alias.name}".strip(".")
                found.add(candidate if (PACKAGE / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE / candidate.replace(".", "/")).is_dir() else target or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name[len("mq_export."):] for a in node.names if a.name.startswith("mq_export."))
    return {m for m in found if m}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_stage():
    for module in GRAPH:
        assert module.split(".")[0] in FOUNDATION | FACADE | set(STAGES), f"{module} is outside the pipeline layout"


def test_no_import_from_a_later_stage():
    backwards = [(m, t) for m, targets in GRAPH.items() for t in targets
                 if rank(t) > rank(m)]
    assert not backwards, f"imports running back up the pipeline: {backwards}"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in GRAPH.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' → '.join(path + [module, target])}")
            if target in GRAPH and not state.get(target):
                visit(target, path + [module])
        state[module] = 2

    for module in GRAPH:
        if not state.get(module):
            visit(module, [])
