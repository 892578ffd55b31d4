"""Shared test helpers: the repository root, the CLI as a subprocess, recipe overrides, the
loader and model of a recipe, real clusters, small shard sets, and the check that every test
carries the marker of its tier (tests/unit, tests/dist, tests/e2e, tests/cluster)."""
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vidscale.data.loader import build_loader
from vidscale.data.shards import ShardWriter
from vidscale.scaling.config import ModelArgs, load_config, model_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# -- tiers: the folder a test lives in names what it does ------------------------------------------
TIERS = {"dist": "dist", "e2e": "e2e", "cluster": "cluster", "gpu": "gpu"}
"""tests/<folder> -> the marker each of its tests must carry: `dist` starts several processes or runs
DeepSpeed / torch.distributed in this process, `e2e` runs the CLI in a subprocess, `cluster`
needs a real Slurm or Ray, `gpu` a CUDA GPU (skipped without one). tests/unit holds everything
else and carries none of them."""


def tier_errors(items) -> list[str]:
    """One line per collected test whose markers do not match its folder."""
    bad = []
    for item in items:
        path = Path(str(item.fspath))
        try:
            folder = path.relative_to(ROOT / "tests").parts[0]
        except ValueError:
            continue
        marks = {m.name for m in item.iter_markers()} & set(TIERS.values())
        want = TIERS.get(folder)
        if want and want not in marks:
            bad.append(f"{item.nodeid}: in tests/{folder} but not marked `{want}`")
        if folder == "unit" and marks:
            bad.append(f"{item.nodeid}: in tests/unit but marked {sorted(marks)} (move it to tests/{sorted(marks)[0]})")
    return bad


def pytest_collection_modifyitems(config, items):
    bad = tier_errors(items)
    if bad:
        raise pytest.UsageError("test markers do not match their folders:\n" + "\n".join(bad))


@pytest.fixture
def root() -> Path:
    return ROOT


# -- the CLI in a subprocess ------------------------------------------------------------------------
def vidscale_cmd(*args) -> list[str]:
    """`vidscale ARGS...` as a subprocess command line."""
    return [sys.executable, "-m", "vidscale.scaling.cli", *map(str, args)]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this one, one thread per rank, plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def vidscale(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `vidscale ARGS...` from the repository root (in this environment unless `env`);
    stdout and stderr captured as text."""
    return subprocess.run(vidscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def set_args(overrides) -> list[str]:
    """`--set KEY=VALUE` for each override: the CLI form of a `load_config` override list."""
    return [a for o in overrides for a in ("--set", o)]


# -- recipes ----------------------------------------------------------------------------------------
QUIET = ["logging.progress=false", "logging.tensorboard=false"]
"""What a test run does not need: a progress bar and TensorBoard files."""


def debug_overrides(*extra: str) -> list[str]:
    """Overrides of a quiet test run of recipes/debug.yaml (`QUIET`), then `extra`."""
    return [*QUIET, *extra]


def debug_config(*extra: str):
    """recipes/debug.yaml loaded with `debug_overrides(*extra)`."""
    return load_config(DEBUG, debug_overrides(*extra))


def short_run(run_dir, *extra: str):
    """A few single-process steps of the debug recipe into `run_dir`: plain torch (no DeepSpeed),
    a log line per step, a short warmup, small synthetic epoch and validation set; then `extra`."""
    return debug_config("parallel.zero_stage=0", "logging.every=1", "optim.warmup=2", "data.synthetic_videos=32",
                        "train.val_videos=2", f"train.run_dir={run_dir}", *extra)


def write_sweep(dir: Path, text: str, name: str = "sweep.yaml") -> Path:
    """A sweep file DIR/NAME over recipes/debug.yaml whose sweep_dir is DIR/out, then `text`."""
    p = dir / name
    p.write_text(f"base: {DEBUG}\nsweep_dir: {dir / 'out'}\n" + text)
    return p


TWO_RUN_SET = {"train.val_videos": 3, "logging.every": 1, "logging.tensorboard": False, "checkpoint.every": 0,
               "train.tokens_per_batch": 512}
"""The `set:` of the sweep tests' two-run sweep: short validation, every loss logged, no checkpoints."""


def write_two_run_sweep(dir: Path, name: str = "", file: str = "sweep.yaml", *, hidden=(32, 48),
                        budgets=("1e9",), schedule: str = "", set: dict | None = None) -> Path:
    """The sweep tests' sweep (`write_sweep`: over recipes/debug.yaml, into DIR/out): one run per
    width in `hidden` (depth 1) and budget in `budgets`, at least 3 steps each, `TWO_RUN_SET`
    updated by `set`; `schedule` (e.g. wsd-branches) and `name` when given."""
    models = ", ".join(f"{{hidden: {h}, depth: 1}}" for h in hidden)
    text = ((f"name: {name}\n" if name else "") + f"models: [{models}]\nbudgets: [{', '.join(budgets)}]\n"
            + (f"schedule: {schedule}\n" if schedule else "")
            + f"min_steps: 3\nset: {json.dumps({**TWO_RUN_SET, **(set or {})})}\n")
    return write_sweep(dir, text, file)


def loader_for(cfg, dp_rank: int = 0, dp_size: int = 1, multiple: int = 1, on_batch=None):
    """The packed loader a recipe's training uses (as `DiTTask.build_loader` builds it)."""
    return build_loader(cfg.data, seed=cfg.train.seed, tokens_per_batch=cfg.train.tokens_per_batch,
                        patch=cfg.model.patch, channels=cfg.model.in_channels, text_dim=cfg.model.text_dim,
                        dp_rank=dp_rank, dp_size=dp_size, multiple=multiple, on_batch=on_batch)


def dit_config(**model):
    """The `DiTConfig` of a recipe's model section with these keys (`ModelArgs` fields) set."""
    return model_config(ModelArgs(**model))


def wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `pred` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# -- real clusters (tests marked `cluster`) -------------------------------------------------------
# Started when missing, once per session, and stopped at the end only if this session started
# them. A test that needs a cluster FAILS (never skips) when it could not be started.
SLURM_DIR = os.environ.get("VIDSCALE_SLURM_DIR", "/tmp/vidscale-slurm")
RAY_TEST_DIR = f"/tmp/vidscale-rt-{os.getuid()}-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:6]}"
"""Per user and checkout: the head a test session shares is private to its user (0700), and
two checkouts on one machine each test their own code."""


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm (cluster/scripts/slurm-up.sh); yields its SLURM_CONF."""
    before = (Path(SLURM_DIR) / "started").read_text() if (Path(SLURM_DIR) / "started").is_file() else ""
    try:
        r = subprocess.run([str(ROOT / "cluster/scripts/slurm-up.sh")], capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, VIDSCALE_SLURM_DIR=SLURM_DIR))
    except subprocess.TimeoutExpired:
        pytest.fail("cluster/scripts/slurm-up.sh did not finish in 600 s")
    if r.returncode != 0 or "SLURM_CONF=" not in r.stdout:
        pytest.fail(f"could not start Slurm (cluster/scripts/slurm-up.sh exit {r.returncode}):\n{r.stderr[-2000:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    after = (Path(SLURM_DIR) / "started").read_text() if (Path(SLURM_DIR) / "started").is_file() else ""
    yield conf
    if after != before:  # this session started something: stop it
        subprocess.run([str(ROOT / "cluster/scripts/slurm-down.sh")], timeout=120,
                       env=dict(os.environ, VIDSCALE_SLURM_DIR=SLURM_DIR))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (head on 127.0.0.1, dashboard and job server); yields its RayHead."""
    from vidscale.cluster.ray_cluster import read_head, start_head, stop_head, token_env
    existing = read_head(RAY_TEST_DIR)
    try:
        head = start_head(num_cpus=4, dir=RAY_TEST_DIR)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"could not start a Ray cluster: {e}")
    os.environ.update(token_env(head.token))  # its clients: the tests' vidscale commands
    yield head
    if existing is None:
        stop_head(head)


def host_bed(n: int):
    """N network-namespace hosts (cluster/scripts/hosts.sh), taken down after the test even when
    it fails. Needs root: a test that needs hosts FAILS when they cannot be made."""
    from vidscale.cluster.hosts import TestBed
    bed = TestBed(n)
    try:
        bed.up()
    except (PermissionError, RuntimeError) as e:
        pytest.fail(f"could not build the {n}-host test bed: {e}")
    return bed


@pytest.fixture
def hosts2():
    bed = host_bed(2)
    yield bed
    bed.down()


@pytest.fixture
def hosts3():
    bed = host_bed(3)
    yield bed
    bed.down()


# The recipe every launcher test trains: recipes/debug.yaml as shipped, on 2 ranks with ZeRO-3.
DEBUG_ZERO3 = ["parallel.zero_stage=3", *QUIET]


def read_losses(run_dir) -> dict[int, float]:
    path = Path(run_dir) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="session")
def debug_zero3_reference(tmp_path_factory):
    """Losses of an uninterrupted 2-rank local run (cluster/local.py): what every launcher, every
    pre-empted and every restarted run must reproduce exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run, *set_args(DEBUG_ZERO3))
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(run)


# -- small prepared shard sets ---------------------------------------------------------------
def write_shards(root: Path, n: int = 40, max_bytes: int = 6000, seed: int = 0) -> Path:
    """n random latent samples (4 channels, 384-d captions) as webdataset shards under root."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    w = ShardWriter(root, max_bytes=max_bytes, patch=(1, 2, 2))
    for i in range(n):
        T, H, W = rng.randint(1, 3), rng.choice([2, 4, 6]), rng.choice([2, 4, 8])
        w.write(torch.randn(4, T, H, W, generator=g), torch.randn(rng.randint(2, 5), 384, generator=g),
                {"caption": f"video {i}"})
    w.close(channels=4, text_dim=384)
    return root


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
