"""`vidscale train recipes/debug.yaml` end to end through the CLI, in a subprocess."""
import json

import pytest
import yaml

from conftest import vidscale  # noqa: E402

pytestmark = pytest.mark.e2e


def test_train_debug_recipe_through_cli(tmp_path):
    run = tmp_path / "run"
    r = vidscale("train", "recipes/debug.yaml", "--run-dir", run, "--set", "train.steps=30", "--set", "logging.every=3")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(3, 31, 3))
    for k in ("step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"):
        assert k in recs[0]
    assert recs[-1]["tokens"] > recs[0]["tokens"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 30 and cfg["model"]["size"] == "debug"
    assert any((run / "tb").iterdir())  # TensorBoard event file


def test_bad_recipe_fails_before_training(tmp_path):
    r = vidscale("train", "recipes/debug.yaml", "--run-dir", tmp_path / "x", "--set", "train.stepz=3", timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "train.stepz" in lines[0] and "train.steps" in lines[0]
    assert not (tmp_path / "x").exists()
