import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def root() -> Path:
    return ROOT


def vidscale_cmd() -> list[str]:
    return [sys.executable, "-m", "vidscale.scaling.cli"]


def wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `pred` until it returns something truthy (returned), or fail naming `what`."""
    import time
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
RAY_TEST_DIR = "/tmp/vidscale-ray-test"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm (cluster/scripts/slurm-up.sh); yields its SLURM_CONF."""
    import subprocess
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
    from vidscale.cluster.ray_cluster import read_head, start_head, stop_head
    existing = read_head(RAY_TEST_DIR)
    try:
        head = start_head(num_cpus=4, dir=RAY_TEST_DIR)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"could not start a Ray cluster: {e}")
    yield head
    if existing is None:
        stop_head(head)


# The recipe every launcher test trains: recipes/debug.yaml as shipped, on 2 ranks with ZeRO-3.
DEBUG_ZERO3 = ["parallel.zero_stage=3", "logging.tensorboard=false", "logging.progress=false"]


def read_losses(run_dir) -> dict[int, float]:
    import json
    path = Path(run_dir) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="session")
def debug_zero3_reference(tmp_path_factory):
    """Losses of an uninterrupted 2-rank local run (cluster/local.py): what every launcher, every
    pre-empted and every restarted run must reproduce exactly."""
    import subprocess
    run = tmp_path_factory.mktemp("reference") / "run"
    cmd = vidscale_cmd() + ["train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", str(run)]
    for o in DEBUG_ZERO3:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(run)


# -- small prepared shard sets ---------------------------------------------------------------
def write_shards(root: Path, n: int = 40, max_bytes: int = 6000, seed: int = 0) -> Path:
    """n random latent samples (4 channels, 384-d captions) as webdataset shards under root."""
    import random
    from vidscale.data.shards import ShardWriter
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
