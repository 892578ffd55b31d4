"""The video VAE trained data-parallel: `task: vae` on 2 processes with ZeRO-3 through the CLI
(the model and the one-process task: tests/unit/test_vae_model.py)."""
import json

import pytest
import torch

from vidscale.models.vae import load_vae

from conftest import cli_env, vidscale  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def test_vae_trains_data_parallel_with_zero3_and_resumes_on_one_process(tmp_path):
    """`task: vae` on 2 processes with ZeRO-3 (gloo): PSNR on held-out clips from every rank's
    share, consolidated weights gathered from the shards at the end. Then the finished run
    is continued on one process (DeepSpeed's universal checkpoint; the clip stream goes on
    where the two ranks stopped)."""
    run = tmp_path / "z3"
    r = vidscale("train", "recipes/vae-debug.yaml", "--run-dir", run, "--nproc", "2", "--set", "parallel.zero_stage=3",
                 "--set", "train.steps=4", "--set", "train.val_every=2", "--set", "logging.every=2",
                 "--set", "logging.progress=false", "--set", "vae.crop=[16,16]", "--set", "checkpoint.every=4",
                 timeout=900, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs if "val_psnr" in rec] == [2, 4]
    vae = load_vae(run)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert vae.encode(x).shape == (1, 4, 2, 2, 2)
    state = json.loads((run / "checkpoints/step_00000004/loader/dp00001.json").read_text())
    assert (state["start"], state["taken"], state["dp"]) == (0, 4, 2)  # 8 clips taken by the two ranks
    r = vidscale("resume", run, "--nproc", "1", "--set", "train.steps=6", timeout=900, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "checkpoints/step_00000006/loader/dp00000.json").read_text())
    assert (state["start"], state["taken"], state["dp"]) == (8, 2, 1)  # on from clip 8 of the stream
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and len(steps) == len(set(steps))
