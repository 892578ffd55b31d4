"""What the training loop records about its steps: the rate each step trained at, one record
per step across restarts (metrics.jsonl, consumed/, TensorBoard), the final weights' origin,
and a pre-emption at the last step."""
import json

import pytest

from vidscale.scaling.train import loop

from conftest import short_run


def test_the_logged_lr_is_the_rate_each_step_trained_at(tmp_path):
    """Warmup over 10 steps: step s (counted from 1) trains at s/10 of optim.lr, and logs that,
    not the next step's rate."""
    cfg = short_run(tmp_path / "run", "train.steps=3", "optim.warmup=10", "train.val_videos=1")
    loop.train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["lr"] for r in recs] == pytest.approx([cfg.optim.lr * s / 10 for s in (1, 2, 3)], rel=1e-12)
