"""The video VAE trained data-parallel: `task: vae` on 2 processes with ZeRO-3 through the CLI
(the model and the one-process task: tests/unit/test_vae_model.py)."""
import json

import pytest
import torch

from vidscale.models.vae import load_vae

from conftest import cli_env, vidscale  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def test_vae_trains_data_parallel_with_zero3(tmp_path):
    """`task: vae` on 2 processes with ZeRO-3 (gloo): PSNR on held-out clips from every rank's
    share, consolidated weights gathered from the shards at the end."""
    run = tmp_path / "z3"
    r = vidscale("train", "recipes/vae-debug.yaml", "--run-dir", run, "--nproc", "2", "--set", "parallel.zero_stage=3",
                 "--set", "train.steps=4", "--set", "train.val_every=2", "--set", "logging.every=2",
                 "--set", "logging.progress=false", "--set", "vae.crop=[16,16]", timeout=900, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs if "val_psnr" in rec] == [2, 4]
    vae = load_vae(run)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert vae.encode(x).shape == (1, 4, 2, 2, 2)
