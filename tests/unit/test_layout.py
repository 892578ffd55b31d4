"""The architecture, checked from the source: one namespace, layers that point one way, no
import circles, collectives in one module, model code free of distributed calls."""
import ast
import os
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import vidscale.cluster
import vidscale.data
import vidscale.models
import vidscale.scaling

from conftest import ROOT, TIERS  # noqa: E402
FOLDERS = ("models", "data", "scaling", "cluster")

# Layers, lowest first. A module may import its own layer and the layers below it; within
# the engine layer, the packages below form a chain of their own (checked for circles).
LAYERS = [
    ("models",),
    ("data",),
    ("scaling.config", "scaling.objective", "scaling.parallel", "scaling.checkpoint", "scaling.inference",
     "scaling.train", "scaling.warmup"),
    ("cluster",),
    ("scaling.study", "scaling.bench", "scaling.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for top in FOLDERS:
        for f in (ROOT / top).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _imports(f: Path, name: str, top_level_only: bool = False):
    """(imported vidscale module, line, at top level) for each import of ours in f."""
    tree = ast.parse(f.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for m in mods:
            if m.startswith("vidscale."):
                yield m.removeprefix("vidscale."), node.lineno, id(node) in top


def _layer(mod: str) -> tuple[int, str]:
    for i, names in enumerate(LAYERS):
        for n in names:
            if mod == n or mod.startswith(n + "."):
                return i, n
    raise AssertionError(f"{mod}: in no layer of tests/test_layout.py")


def _graph():
    mods = _modules()
    g = defaultdict(set)
    for name, f in mods.items():
        for m, line, _ in _imports(f, name):
            if m in mods and m != name:
                g[name].add((m, line))
    return mods, g


def test_packages_resolve_to_this_repo():
    for pkg, folder in ((vidscale.models, "models"), (vidscale.data, "data"), (vidscale.scaling, "scaling"),
                        (vidscale.cluster, "cluster")):
        assert Path(pkg.__file__).resolve().parent == ROOT / folder, pkg.__file__


def test_no_generic_top_level_import_names(tmp_path):
    """Outside the repository only `vidscale.*` is importable: `models`, `data`, ... are not."""
    code = ("import importlib, sys\n"
            "for n in ('models', 'data', 'scaling', 'cluster'):\n"
            "    try:\n        importlib.import_module(n)\n    except ImportError:\n        continue\n"
            "    sys.exit('importable: ' + n)\n"
            "import vidscale.models.dit, vidscale.scaling.cli.main\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_every_package_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vidscale." + ".".join(p.parent.relative_to(ROOT).parts)
             for top in FOLDERS for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found


def test_layers_point_one_way():
    mods, g = _graph()
    bad = []
    for a, deps in g.items():
        la, _ = _layer(a)
        for b, line in deps:
            lb, _ = _layer(b)
            if lb > la:
                bad.append(f"{mods[a].relative_to(ROOT)}:{line} imports {b} (a higher layer)")
    assert not bad, "\n".join(bad)


def _cycles(nodes_edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in nodes_edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(nodes_edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_modules():
    _, g = _graph()
    edges = {a: {b for b, _ in deps} for a, deps in g.items()}
    assert not _cycles(edges), _cycles(edges)


def test_no_import_circles_between_packages():
    """Packages as nodes: models, data, cluster and each sub-package of scaling."""
    _, g = _graph()

    def pkg(m):
        parts = m.split(".")
        return ".".join(parts[:2]) if parts[0] == "scaling" else parts[0]
    edges = defaultdict(set)
    for a, deps in g.items():
        for b, _ in deps:
            if pkg(a) != pkg(b):
                edges[pkg(a)].add(pkg(b))
    assert not _cycles(edges), _cycles(edges)


# Imports of ours that may stay inside functions: none. Heavy third-party ones (deepspeed,
# ray, diffusers, matplotlib, av, ...) may be imported where they are used.
def test_our_imports_are_at_the_top_of_files():
    mods = _modules()
    bad = [f"{f.relative_to(ROOT)}:{line} imports {m} inside a function"
           for name, f in mods.items() for m, line, top in _imports(f, name) if not top]
    assert not bad, "\n".join(bad)


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "scatter",
               "reduce", "gather_object", "scatter_object_list", "monitored_barrier"}


def test_collectives_only_in_the_collectives_module():
    """Every collective the project issues goes through scaling/parallel/collectives.py, which
    puts tensors on the process group's device (a CPU tensor on nccl has no backend)."""
    allowed = ROOT / "scaling/parallel/collectives.py"
    bad = []
    for top in FOLDERS:
        for f in (ROOT / top).rglob("*.py"):
            if f == allowed:
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name)
                        and node.value.id in ("dist", "torch_dist")):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} dist.{node.attr}")
                if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                    bad += [f"{f.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                            if a.name in COLLECTIVES]
    assert not bad, "\n".join(bad)


def test_models_import_no_distributed_code():
    banned = ("torch.distributed", "deepspeed", "ray")
    for f in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in banned), f"{f}: imports {n}"


def test_training_code_never_imports_ray():
    for sub in ("scaling", "models", "data"):
        for f in (ROOT / sub).rglob("*.py"):
            if f.relative_to(ROOT).parts[:2] in (("scaling", "cli"), ("scaling", "study")):
                continue  # above the launchers: they may start Ray clusters through cluster/
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(m == "ray" or m.startswith("ray.") for m in mods), f"{f} imports ray"


def _mark_names(nodes) -> set[str]:
    """NAME of each `pytest.mark.NAME` or `pytest.mark.NAME(...)` among the nodes."""
    names = set()
    for d in nodes:
        d = d.func if isinstance(d, ast.Call) else d
        if isinstance(d, ast.Attribute) and isinstance(d.value, ast.Attribute) and d.value.attr == "mark":
            names.add(d.attr)
    return names


def test_every_test_carries_the_marker_of_its_folder():
    """tests/dist -> `dist`, tests/e2e -> `e2e`, tests/cluster -> `cluster` (a module-level
    `pytestmark` or a decorator); tests/unit carries none of them. Read from the source, so a
    unit run checks every folder; conftest checks the collected items the same way."""
    tiers = set(TIERS.values())
    bad = []
    for f in sorted((ROOT / "tests").glob("*/test_*.py")):
        folder, tree = f.parent.name, ast.parse(f.read_text())
        module = set()
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets):
                module |= _mark_names(n.value.elts if isinstance(n.value, (ast.List, ast.Tuple)) else [n.value])
        for n in tree.body:
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"):
                marks = (module | _mark_names(n.decorator_list)) & tiers
                where = f"{f.relative_to(ROOT)}::{n.name}"
                if folder in TIERS and TIERS[folder] not in marks:
                    bad.append(f"{where}: not marked `{TIERS[folder]}`")
                if folder == "unit" and marks:
                    bad.append(f"{where}: marked {sorted(marks)} in tests/unit")
    assert not bad, "\n".join(bad)
