"""The direction of imports (CONVENTIONS.md, Layering), checked two ways.

1. Statically: every ``import`` of every module under ``src/bluestream`` (function-level
   ones included, they are imports too) is read with :mod:`ast`; each package may import
   only the packages the table below allows, and the module graph has no cycle.
2. Dynamically: importing the read side or a store in a fresh interpreter loads neither
   the daemon, the Kafka client nor (for SQLite) pymongo.

How it was checked that these fail: re-adding ``from bluestream.daemon.config import
load_settings`` to ``catalog/core.py`` (the import the review found) fails both the table
check and the fresh-interpreter check; making ``storage/mongo.py`` import ``mask_uri`` from
``storage/backends.py`` (which imports ``mongo``) fails the cycle check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bluestream"

#: The bottom: small package-level modules every layer may use.
BASE = {"errors", "limits", "layout", "documents", "queries", "counters", "handlers", "log",
        "_version", "gc_tuning"}
#: Package (or top-level module) -> what it may import besides itself and BASE.
ALLOWED: dict[str, set[str]] = {
    **{name: set() for name in BASE},
    "schemas": set(),
    "storage": set(),
    "settings": {"storage"},
    "consumers": {"schemas", "storage", "settings"},
    "catalog": {"schemas", "storage", "settings"},
    "daemon": {"consumers", "schemas", "storage", "settings"},
    "tools": {"catalog", "consumers", "daemon", "schemas", "storage", "settings", "tiled"},
    "tiled": {"catalog", "storage", "settings"},
    "cli": {"daemon", "tools", "settings", "storage"},
    "__main__": {"cli"},
    "__init__": {"catalog", "storage"},  # storage: the ZarrRoot type of open_catalog
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every bluestream module ``path`` imports (``from x import y`` counts x and x.y)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names}
            found.update(subs)
            if not all(_is_module(m) for m in subs):  # names defined in ``mod`` itself
                found.add(mod)
    return {m for m in found if m == "bluestream" or m.startswith("bluestream.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_every_module_is_in_a_layer() -> None:
    unknown = {_layer(m) for m in _graph()} - ALLOWED.keys()
    assert not unknown, f"add these to ALLOWED in {__file__}: {sorted(unknown)}"


def test_imports_point_down_only() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module)
        for target in targets:
            to = _layer(target)
            if to != layer and to not in BASE and to not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target} ({layer} -> {to})")
            if layer in BASE and to != layer and to not in BASE:
                wrong.append(f"{module} imports {target} (the base imports nothing above)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph (lazy imports too),
    ignoring a package's ``__init__`` re-exporting its own modules."""
    graph = _graph()
    edges = {m: {t for t in ts if not (m in t and t.startswith(m + "."))}
             for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_table_catches_a_forbidden_import() -> None:
    """The checker itself: a catalog module importing the daemon is reported."""
    assert "daemon" not in ALLOWED["catalog"] and "daemon" not in ALLOWED["consumers"]
    assert "daemon" not in ALLOWED["storage"] and "catalog" not in ALLOWED["storage"]
    graph = _graph()
    per_layer: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        per_layer[_layer(module)].update(_layer(t) for t in targets)
    assert "daemon" not in per_layer["catalog"]
    assert "daemon" not in per_layer["consumers"]


@pytest.mark.parametrize(("statement", "forbidden"), [
    ("import bluestream.catalog.core",
     ["bluestream.daemon", "bluestream.consumers", "bluestream.tools", "aiokafka"]),
    ("import bluestream.settings", ["bluestream.daemon", "bluestream.consumers", "aiokafka"]),
    ("import bluestream.consumers.pipeline",
     ["bluestream.daemon", "bluestream.tools", "bluestream.catalog"]),
    ("import bluestream.storage.sqlite", ["pymongo", "bluestream.daemon", "aiokafka"]),
    ("import bluestream.schemas", ["bluestream.storage", "zarr", "aiokafka", "pymongo"]),
    ("import bluestream.layout", ["bluestream.storage", "bluestream.schemas", "zarr"]),
    ("import bluestream", ["bluestream.catalog", "zarr", "xarray"]),
])
def test_fresh_interpreter_loads_nothing_above(statement: str, forbidden: list[str]) -> None:
    code = (f"{statement}\nimport sys\n"
            f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted({f.split('.')[0] for f in forbidden})!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    loaded = [m for m in out for f in forbidden if m == f or m.startswith(f + ".")]
    assert not loaded, f"{statement} loaded {sorted(set(loaded))}"
