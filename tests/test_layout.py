"""The package layout: no import cycles (lazy imports inside functions included) and layers that
only import downwards: contract -> model -> formats -> data -> training / inference -> evaluation
-> serving -> demo -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# top-level module or package -> layer; a module may import its own layer and those below
LAYERS = {
    "version": 0, "config": 0, "tokenizer": 0, "flow": 0, "image_transforms": 0, "precision": 0,  # the model's contract
    "model": 1,
    "formats": 2,
    "data": 3,
    "training": 4, "inference": 4,  # side by side: neither imports the other
    "evaluation": 5,
    "serving": 6,
    "demo": 7,
    "cli": 8,
    "train": 9, "__main__": 9,
}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """Every project module ``name`` imports anywhere in its body, with the packages whose
    ``__init__`` such an import runs (the importer's own ancestors excluded: they are already loading)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            targets |= submodules  # `from pkg import module` runs the module ...
            if len(submodules) < len(node.names) and target in modules:
                targets.add(target)  # ... `from pkg import name` reads pkg itself
    edges = set()
    for target in targets - {name}:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            owner = ".".join(parts[:i])
            if owner in modules and owner != name and not name.startswith(owner + "."):
                edges.add(owner)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, pkg, modules) for name, (path, pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_including_lazy_imports():
    graph = _graph()
    assert len(graph) > 80 and "unimedvl.inference.pipeline" in graph
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + "\n  " + "\n  ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles)


def test_layers_only_import_downwards():
    graph = _graph()
    layer_of = {}
    for name in graph:
        parts = name.split(".")
        if len(parts) > 1:
            assert parts[1] in LAYERS, f"{name}: add its top-level package to LAYERS (and to the README tree)"
            layer_of[name] = (parts[1], LAYERS[parts[1]])
    wrong = []
    for name, targets in graph.items():
        if name not in layer_of:
            continue  # the package root re-exports the public API
        top, layer = layer_of[name]
        for target in targets:
            if target in layer_of:
                t_top, t_layer = layer_of[target]
                if t_layer > layer or (t_layer == layer and t_top != top and {top, t_top} == {"training", "inference"}):
                    wrong.append(f"{name} ({top}) imports {target} ({t_top})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))
