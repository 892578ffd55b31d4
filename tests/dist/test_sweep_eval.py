"""The validation loss a sweep fits is the same number on every parallel layout (the fixed
held-out set and its grouping: tests/unit/test_evaluate.py)."""
import json

import pytest

from conftest import debug_overrides, set_args, vidscale  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def test_val_loss_is_the_same_on_every_layout(tmp_path):
    """Train 4 steps on one process; score that checkpoint again on 2 ranks as sp=2 and as
    dp=2 (resume with nothing left to train, so only the final evaluation runs)."""
    base = set_args(debug_overrides("train.steps=4", "train.val_videos=5", "checkpoint.every=0"))

    def run(run_dir, *extra):
        r = vidscale("train", "recipes/debug.yaml", "--run-dir", run_dir, *base, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return json.loads((run_dir / "final.json").read_text())

    ref = run(tmp_path / "one")
    ckpt = str(tmp_path / "one")
    sp = run(tmp_path / "sp2", "--nproc", "2", "--set", "parallel.ulysses=2", "--set", f"checkpoint.resume={ckpt}")
    dp = run(tmp_path / "dp2", "--nproc", "2", "--set", f"checkpoint.resume={ckpt}")
    assert sp["steps"] == dp["steps"] == ref["steps"] == 4 and sp["tokens"] == ref["tokens"]
    assert sp["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5, abs=1e-6)
    assert dp["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5, abs=1e-6)
