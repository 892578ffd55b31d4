"""final.json's FLOPs, which a sweep's fit reads as the run's compute."""
import json

import pytest

from vidscale.scaling.train import loop

from conftest import short_run


def test_run_resumed_at_its_last_step_reports_its_flops(tmp_path):
    """A run killed in its final evaluation, after its last checkpoint, resumes at step ==
    steps and trains nothing: its final.json still carries the run's FLOPs (estimated per token
    from its own batches), close to those counted when it trained, never 0."""
    run = tmp_path / "run"
    cfg = short_run(run, "train.steps=4", "logging.every=2", "checkpoint.resume=auto")
    loop.train(cfg)
    first = json.loads((run / "final.json").read_text())
    (run / "final.json").unlink()  # as if killed during the evaluation
    loop.train(cfg)
    again = json.loads((run / "final.json").read_text())
    assert again["steps"] == first["steps"] == 4 and again["tokens"] == first["tokens"]
    assert again["val_loss"] == first["val_loss"]
    assert again["flops"] == pytest.approx(first["flops"], rel=0.15) and first["flops"] > 0
