"""The package's import graph, read from the source with ``ast`` (function-level imports included).

Rules (issue 13): no import cycle; no module imports a ``_private`` name from another subpackage
(neither ``from m import _x`` nor ``m._x`` on an imported module); a subpackage imports only from
itself and the ones above it in the order models -> tasks -> patching -> heads -> attribution ->
fast_weights -> analyze -> (cli, bench). The top-level ``errors``, ``io`` and ``report`` are
importable by all; ``errors`` imports nothing of ours, ``io`` may import ``models`` (provenance),
``report`` may import ``errors`` and ``io``; ``results`` (the common result surface) those three.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = "icl_circuits"
SRC = Path(__file__).resolve().parent.parent / PKG
ORDER = ["models", "tasks", "patching", "heads", "attribution", "fast_weights", "analyze", "lab", ("cli", "bench")]
LEVEL = {name: i for i, entry in enumerate(ORDER) for name in ((entry,) if isinstance(entry, str) else entry)}
SHARED = {"errors": set(), "shapes": {"errors"}, "io": {"errors", "models"}, "report": {"errors", "io"},
          "results": {"errors", "io", "report"}}

# Known violations that another engineer is removing: delete an entry once its fix has landed.
# (importer, imported) pairs exempt from the order rule only.
ALLOW_ORDER: dict[tuple[str, str], str] = {}


@dataclass
class Module:
    name: str  # dotted: icl_circuits.tasks.prompts
    path: Path
    imports: dict[str, list[int]] = field(default_factory=dict)  # imported module -> lines
    private: list[tuple[int, str]] = field(default_factory=list)  # (line, "module._name")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group(name: str) -> str:
    """The unit the rules speak of: ``models``, ``io``, ... or ``icl_circuits`` for the root package."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else PKG


def read_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        modules[module_name(path)] = Module(module_name(path), path)
    for mod in modules.values():
        _read_imports(mod, modules)
    return modules


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.name.split(".")
    if mod.path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _read_imports(mod: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    aliases: dict[str, str] = {}  # local name -> our module it is bound to

    def add(target: str, line: int) -> None:
        mod.imports.setdefault(target, []).append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    add(a.name, node.lineno)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(mod, node)
            if not (source == PKG or source.startswith(PKG + ".")):
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in modules:  # `from pkg import module`
                    add(sub, node.lineno)
                    aliases[a.asname or a.name] = sub
                else:
                    add(source, node.lineno)
                    if _is_private(a.name) and group(source) != group(mod.name):
                        mod.private.append((node.lineno, f"{source}.{a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = aliases[node.value.id]
            if _is_private(node.attr) and group(target) != group(mod.name):
                mod.private.append((node.lineno, f"{target}.{node.attr}"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def graph_of(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {m.name: {t for t in m.imports if t in modules and t != m.name} for m in modules.values()}


def order_violations(modules: dict[str, Module]) -> list[str]:
    root_deps = {group(t) for t in modules[PKG].imports if t in modules} - {PKG}
    root_level = max((LEVEL[g] for g in root_deps if g in LEVEL), default=0)
    bad = []
    for mod in modules.values():
        src = group(mod.name)
        for target, lines in sorted(mod.imports.items()):
            dst = group(target)
            if dst == src or src == PKG:
                continue
            if src in SHARED:
                ok = dst in SHARED[src]
            elif dst in SHARED:
                ok = True
            elif dst == PKG:
                ok = LEVEL[src] >= root_level
            else:
                ok = LEVEL[dst] <= LEVEL[src]
            if not ok and (mod.name, target) not in ALLOW_ORDER:
                bad.append(f"{mod.name} (line {lines[0]}) imports {target}: {src} may not import {dst}")
    return bad


def test_the_reader_sees_every_module_and_resolves_relative_imports():
    modules = read_modules()
    assert {"icl_circuits", "icl_circuits.errors", "icl_circuits.tasks.prompts", "icl_circuits.cli"} <= set(modules)
    # the root package re-exports from errors and models, so the reader must see those edges
    assert {"icl_circuits.errors", "icl_circuits.models"} <= set(modules[PKG].imports)
    # a function-level import: io reads model_info inside a function
    assert "icl_circuits.models" in modules["icl_circuits.io"].imports


def test_cycle_finder_and_order_rules_catch_a_planted_violation():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    planted = {
        PKG: Module(PKG, SRC / "__init__.py", {"icl_circuits.models": [1]}),
        "icl_circuits.models.loading": Module("icl_circuits.models.loading", SRC / "x.py",
                                              {"icl_circuits.heads.scan": [3]}),  # fmt: skip
        "icl_circuits.heads.scan": Module("icl_circuits.heads.scan", SRC / "y.py", {"icl_circuits.io": [5]}),
        "icl_circuits.io": Module("icl_circuits.io", SRC / "io.py", {"icl_circuits.tasks.prompts": [7]}),
    }
    assert sorted(order_violations(planted)) == [
        "icl_circuits.io (line 7) imports icl_circuits.tasks.prompts: io may not import tasks",
        "icl_circuits.models.loading (line 3) imports icl_circuits.heads.scan: models may not import heads",
    ]


def test_no_import_cycle():
    found = cycles(graph_of(read_modules()))
    assert not found, "import cycles (each list is one strongly connected set of modules):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_no_private_name_imported_across_subpackages():
    bad = [f"{m.name} (line {line}) uses {name}" for m in read_modules().values() for line, name in m.private]
    assert not bad, "private names used across subpackages (make them public or move them):\n" + "\n".join(bad)


def test_subpackages_import_only_from_those_above_them():
    bad = order_violations(read_modules())
    assert not bad, f"imports against the order {ORDER}:\n" + "\n".join(bad)


def test_allow_list_entries_are_still_needed():
    modules = read_modules()
    stale = [pair for pair in ALLOW_ORDER if pair[1] not in modules.get(pair[0], Module("", SRC)).imports]
    assert not stale, f"delete these ALLOW_ORDER entries, the import is gone: {stale}"


def test_private_names_are_caught_in_both_spellings_and_relative_imports_resolve(tmp_path):
    src = tmp_path / "fake.py"
    src.write_text(
        "from icl_circuits.fast_weights.decompose import _per_head_act\n"
        "from icl_circuits.heads import scores as s\n"
        "def f():\n"
        "    from icl_circuits.tasks import prompts as p\n"
        "    return p._helper, s._same_subpackage_is_fine, p.__name__\n"
        "from . import composition\n"
        "from ..tasks.pairs import _y\n"
    )
    mod = Module("icl_circuits.heads.fake", src)
    _read_imports(mod, read_modules())
    assert sorted(mod.private) == [
        (1, "icl_circuits.fast_weights.decompose._per_head_act"),
        (5, "icl_circuits.tasks.prompts._helper"),
        (7, "icl_circuits.tasks.pairs._y"),
    ]
    assert {"icl_circuits.heads.composition", "icl_circuits.tasks.pairs", "icl_circuits.tasks.prompts"} <= set(
        mod.imports
    )
