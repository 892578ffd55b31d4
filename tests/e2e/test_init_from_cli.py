"""`vidscale train --init-from`: a source that does not fit is refused by the launcher in one line,
before any rank starts or anything is written into the run directory."""
import pytest
import torch

from vidscale.models.dit import VideoDiT
from vidscale.scaling.checkpoint.weights import save_weights
from vidscale.scaling.config import model_config
from vidscale.scaling.parallel.parallelize import build_model

from conftest import QUIET, debug_config, set_args, vidscale  # noqa: E402

pytestmark = pytest.mark.e2e


def test_resize_and_own_directory_are_refused_before_the_ranks_start(tmp_path):
    cfg = debug_config()
    model = build_model(lambda: VideoDiT(model_config(cfg.model)), torch.device("cpu"), 0)
    f = save_weights(model.state_dict(), tmp_path / "a.safetensors", cfg)
    run = tmp_path / "run"
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run, "--init-from", f,
                 *set_args([*QUIET, "model.in_channels=8"]), timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith(f"vidscale train: error: train.init_from={f}: 3 parameter(s) differ in shape: "
                             "x_embed.weight (file [96, 16], model [96, 32])"), err
    assert "train.init_allow_resize=true" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no rank ran: no recipe, log or checkpoint
    r = vidscale("train", "recipes/debug.yaml", "--run-dir", run, "--init-from", run, *set_args(QUIET), timeout=300)
    assert r.returncode == 2 and "that is this run's own directory" in r.stderr, r.stderr[-3000:]
