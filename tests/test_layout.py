"""The package layout: the stages are visible, imports form no cycle, nothing lower imports anything higher.

Every import statement of every module under adapt/ counts, those inside functions too: an import made
lazy keeps `--help` fast, it does not excuse a cycle or an import against the layer order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapt"

LAYERS = [  # bottom to top: a module imports modules of its own layer or of the layers below, never above
    ("adapt.core", "shared vocabulary: errors, checkpoint format, locate, diffusion math, masks, outputs"),
    ("adapt.loading", "load a checkpoint to run it: weights dtype for the device, the model"),
    ("adapt.sampling", "diffusion decoding"),
    ("adapt.serving", "the OpenAI HTTP API over the sampler: requests, batches, streams (`adapt serve`)"),
    ("adapt.conversion", "AR model -> diffusion checkpoint, and its checks (which sample with the cache)"),
    ("adapt.publishing", "Hub push and model card (training's run pushes its export)"),
    ("adapt.training", "fine-tuning: recipe, data, objectives, engine, setup, loop, checkpoints, export"),
    ("adapt.evaluation", "ELBO bounds, generative perplexity, the lm-eval model"),
    ("adapt", "the app: cli, quickstart, demo, sources, tiny, entry points, the package's facade"),
]
LINE_BUDGET = 500
OVER_BUDGET = {  # module -> its own cap, until it is split
    "adapt.evaluation.evaluate": 600,
    "adapt.publishing.hub": 600,
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import adapt.a.b` binds adapt.a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a] of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def layer_of(name: str, layers: list[tuple[str, str]] = LAYERS) -> int:
    """Index of the longest layer prefix of `name` (every module is under `adapt`, the top layer)."""
    best = max(
        (prefix for prefix, _ in layers if name == prefix or name.startswith(prefix + ".")),
        key=len,
    )
    return [prefix for prefix, _ in layers].index(best)


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, str]] = LAYERS) -> list[str]:
    return [
        f"{a} ({layers[layer_of(a, layers)][0]}) imports {b} ({layers[layer_of(b, layers)][0]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b, layers) > layer_of(a, layers)
    ]


# ----------------------------------------------------------------------------- the package


def test_the_graph_sees_every_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "adapt.core.errors" in graph and "adapt.training.loop" in graph and "adapt" in graph
    assert "adapt.core.errors" in graph["adapt.core.boundary"]
    # lazy, inside a command function: still an edge
    assert "adapt.training.run" in graph["adapt.cli"]
    # `from adapt.training import engine` is the module adapt.training.engine
    assert "adapt.training.engine" in graph["adapt.training.setup"]


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None


def test_nothing_imports_a_higher_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_every_stage_package_is_a_layer() -> None:
    packages = {module_name(p.parent) for p in PACKAGE.glob("*/__init__.py")}
    layered = {prefix for prefix, _ in LAYERS}
    # a package nested in a layer (training/objectives) belongs to its parent's
    assert packages <= layered, f"give these packages a layer in LAYERS: {sorted(packages - layered)}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_has_a_docstring_and_fits_the_line_budget(name: str) -> None:
    path = modules()[name]
    text = path.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{path}: say its one job in a module docstring"
    lines = len(text.splitlines())
    budget = OVER_BUDGET.get(name, LINE_BUDGET)
    assert lines <= budget, f"{path} has {lines} lines (budget {budget}): split it by job"
    if name in OVER_BUDGET:
        assert lines > LINE_BUDGET, f"{path} fits {LINE_BUDGET} lines now: drop it from OVER_BUDGET"


# ----------------------------------------------------------------------------- the checks can fail


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_upward_imports_are_named() -> None:
    layers = [("adapt.core", ""), ("adapt.training", ""), ("adapt", "")]
    graph = {
        "adapt.core.checkpoint": {"adapt.training.loop"},  # upward
        "adapt.training.loop": {"adapt.core.checkpoint"},
        "adapt.cli": {"adapt.training.loop"},
    }
    assert upward_imports(graph, layers) == [
        "adapt.core.checkpoint (adapt.core) imports adapt.training.loop (adapt.training)"
    ]


def test_a_hidden_function_level_cycle_is_seen(tmp_path: Path) -> None:
    root = tmp_path / "adapt"
    (root / "core").mkdir(parents=True)
    (root / "__init__.py").write_text('"""pkg"""\n')
    (root / "core" / "__init__.py").write_text('"""core"""\n')
    (root / "core" / "a.py").write_text("from adapt.core import b\n")
    (root / "core" / "b.py").write_text("def f():\n    from adapt.core.a import g\n")
    (root / "cli.py").write_text("from . import core\nfrom .core.b import f\n")
    graph = import_graph(root)
    assert graph["adapt.core.a"] == {"adapt.core.b"} and graph["adapt.core.b"] == {"adapt.core.a"}
    assert graph["adapt.cli"] == {"adapt.core", "adapt.core.b"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"adapt.core.a", "adapt.core.b"} and cycle[0] == cycle[-1]
