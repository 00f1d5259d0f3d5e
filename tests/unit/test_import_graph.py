"""The import graph of mtrain/ and data_pipeline/: no circles, no imports of the entry points from below.

Every `import` counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mtrain", "data_pipeline")
# The layers below the entry points: none of them may import `mtrain.cli` or `mtrain.embed`.
LOWER_LAYERS = ("mtrain.engine", "mtrain.task", "mtrain.model", "mtrain.checkpoint", "data_pipeline")
ENTRY_POINTS = ("mtrain.cli", "mtrain.embed")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from a import b` counts as `a.b` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # The longest project module the target names: `a.b.func` -> `a.b`.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    modules = {module_name(path) for path in files}
    return {module_name(path): imported_modules(path, modules) for path in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "data_pipeline.pairs" in graph["mtrain.engine.data"]  # imported inside pair_spec
    assert "mtrain.config.schema" in graph["mtrain.task.contrastive"]


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_the_entry_points() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.startswith(LOWER_LAYERS)
        for target in targets
        if target in ENTRY_POINTS
    )
    assert upward == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every project module `start` imports, directly or through others (lazy imports included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_inference_entry_point_reaches_no_training_code() -> None:
    # `mtrain.infer` runs an export on stock transformers + PEFT: it may reuse the pure tensor helpers
    # of mtrain/model, never config, task, engine, checkpoint, launch or the data pipeline.
    assert reachable(import_graph(), "mtrain.infer") == {
        "mtrain.model.anyres",
        "mtrain.model.embedding_head",
        "mtrain.model.token_scales",
    }
