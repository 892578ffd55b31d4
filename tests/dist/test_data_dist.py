"""Two data-parallel processes (gloo, DeepSpeed) train from shards of which one is truncated:
the rank that loses samples skips and counts them, and neither rank waits for the other."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, truncate, write_shards


@pytest.mark.e2e
@pytest.mark.dist
def test_truncated_shard_never_leaves_a_rank_waiting(tmp_path):
    src = write_shards(tmp_path / "s", n=24, max_bytes=20000)
    index = json.loads((src / "index.json").read_text())
    assert len(index["shards"]) >= 2
    for s in index["shards"][1:]:  # keep shard 0 whole: the ranks lose different numbers of samples
        truncate(src / s["name"], 0.4)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli", "train", "recipes/debug.yaml", "--nproc", "2",
                        "--run-dir", str(run), "--set", f"data.source={src}", "--set", "parallel.zero_stage=1",
                        "--set", "train.tokens_per_batch=64", "--set", "data.lookahead=4",
                        "--set", "train.steps=8", "--set", "logging.every=1", "--set", "checkpoint.every=0",
                        "--set", "logging.progress=false", "--set", "parallel.timeout_s=120"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    logs = r.stderr + "".join(p.read_text() for p in (run / "logs").glob("*.log")) if (run / "logs").exists() \
        else r.stderr
    assert "data: skipped" in logs
