"""The house keeps its shape: rooms import only downward, no import cycles, a torch-free core.

Read statically from the package's own source (every import, at module level or inside a function),
so a lazy import cannot hide an upward arrow. The order is the one DEVELOPERS.md states.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mlmfilter"

#: rooms from the ground up: a room may import its own layer and the layers below it, never above
LAYERS: list[set[str]] = [
    {"core"},  # torch-free vocabulary: Sample, errors, stats, identity, ids, processes
    {"judge"},  # prompts, conversations, readout maths
    {"io", "images", "models"},  # reading shards, decoding images, loading models
    {"clients", "runs"},  # the OpenAI-compatible client; the stage-generic run layer
    {"backends", "convert", "selection", "training"},
    {"scorers"},  # scorers and the score stage
    {"enhance", "teach", "evaluation", "report"},  # workflows
    {"api"},  # every verb
    {"demo"},
    {"cli"},  # flags -> one api call -> print
]
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
#: the run layer names no stage: nothing above it but what every stage shares
RUNS_MAY_IMPORT = {"core", "io", "runs"}
ROOT_FILES = {"__init__.py", "api.py", "__main__.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported mlmfilter module, names taken from it, line) for every import in the file."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            names = [alias.name for alias in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(s, [], node.lineno) for s in subs]
            if len(subs) < len(names):
                found.append((base, [n for n in names if f"{base}.{n}" not in MODULES], node.lineno))
    out = []
    for target, names, line in found:
        if target.split(".")[0] != "mlmfilter":
            continue
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != module:
            out.append((target, names, line))
    return out


def _edges() -> dict[str, list[tuple[str, list[str], int]]]:
    edges = {}
    for module, path in MODULES.items():
        edges[module] = [
            (t, n, line)
            for t, n, line in _imports(module, path)
            # a package face re-exporting its own submodules, and the package face itself, are not dependencies
            if t != "mlmfilter" and not (path.name == "__init__.py" and t.startswith(module + "."))
        ]
    return edges


EDGES = _edges()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative enough for this size)."""
    index, low, stack, on, result, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycle_between_files():
    graph = {m: {t for t, _, _ in edges} for m, edges in EDGES.items()}
    assert _cycles(graph) == []


def test_no_import_cycle_between_rooms():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, edges in EDGES.items():
        for target, _, _ in edges:
            if _room(module) != _room(target):
                graph[_room(module)].add(_room(target))
    assert _cycles(dict(graph)) == []


def test_rooms_import_only_downward():
    unknown = sorted({_room(m) for m in MODULES} - set(LEVEL) - {"__init__"})
    assert unknown == [], f"rooms without a place in LAYERS (add them, and to DEVELOPERS.md): {unknown}"
    upward = []
    for module, edges in EDGES.items():
        source = _room(module)
        if source == "__init__":
            continue  # the package face re-exports api lazily
        for target, _, line in edges:
            if LEVEL[_room(target)] > LEVEL[source]:
                upward.append(f"{MODULES[module].relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == []


def test_the_run_layer_names_no_stage():
    above = [
        f"{MODULES[m].relative_to(PACKAGE)}:{line} imports {t}"
        for m, edges in EDGES.items()
        if _room(m) == "runs"
        for t, _, line in edges
        if _room(t) not in RUNS_MAY_IMPORT
    ]
    assert above == []


def test_core_is_torch_free_and_imports_nothing_of_the_package():
    offending = []
    for module, path in MODULES.items():
        if _room(module) != "core":
            continue
        for target, _, line in EDGES[module]:
            if _room(target) != "core":
                offending.append(f"{path.name}:{line} imports {target}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offending += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "torch"]
    assert offending == []


def test_the_package_root_holds_only_the_public_face():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_FILES)
    assert loose == []


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{MODULES[m].relative_to(PACKAGE)}:{line} imports {name} from {t}"
        for m, edges in EDGES.items()
        for t, names, line in edges
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


@pytest.mark.parametrize("test_file", sorted(Path(__file__).parent.rglob("test_*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(test_file):
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert [m for m in imported if m.startswith("tests.") and m.rpartition(".")[2].startswith("test_")] == []
