"""Install layout and the rule that model code stays free of distributed calls."""
import ast
from pathlib import Path

import cluster
import data
import models
import scaling

ROOT = Path(__file__).resolve().parents[1]


def test_packages_resolve_to_this_repo():
    for pkg in (models, data, scaling, cluster):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT, pkg.__file__


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
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(m == "ray" or m.startswith("ray.") for m in mods), f"{f} imports ray"
