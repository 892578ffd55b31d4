"""The training loop in this process on recipes/debug.yaml as shipped: DeepSpeed ZeRO-3 on a
world of one (the recipe's parallel.zero_stage)."""
import pytest

from vidscale.scaling.train.loop import train
from vidscale.scaling.train.metrics import read_metrics

from conftest import debug_config  # noqa: E402

pytestmark = pytest.mark.dist


def test_training_loss_falls_on_synthetic_data(tmp_path):
    cfg = debug_config(f"train.run_dir={tmp_path}", "train.steps=60", "logging.every=1", "checkpoint.every=0")
    train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
