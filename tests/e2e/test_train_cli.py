"""`vidscale train recipes/debug.yaml` end to end through the CLI, in a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT  # noqa: E402


@pytest.mark.e2e
def test_train_debug_recipe_through_cli(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli", "train", "recipes/debug.yaml", "--run-dir", str(run),
                        "--set", "train.steps=30", "--set", "logging.every=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(3, 31, 3))
    for k in ("step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"):
        assert k in recs[0]
    assert recs[-1]["tokens"] > recs[0]["tokens"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 30 and cfg["model"]["size"] == "debug"
    assert any((run / "tb").iterdir())  # TensorBoard event file


@pytest.mark.e2e
def test_bad_recipe_fails_before_training(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli", "train", "recipes/debug.yaml",
                        "--run-dir", str(tmp_path / "x"), "--set", "train.stepz=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "train.stepz" in lines[0] and "train.steps" in lines[0]
    assert not (tmp_path / "x").exists()


def test_training_loss_falls_on_synthetic_data(tmp_path):
    from vidscale.scaling.config import load_config
    from vidscale.scaling.train.loop import train
    from vidscale.scaling.train.metrics import read_metrics
    cfg = load_config(ROOT / "recipes/debug.yaml", [f"train.run_dir={tmp_path}", "train.steps=60",
                                                    "logging.every=1", "logging.progress=false",
                                                    "logging.tensorboard=false", "checkpoint.every=0"])
    train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
