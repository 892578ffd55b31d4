"""The issue's reproduction through the CLI, checked from what the ranks really trained on
(`data.record_consumed`): 8 samples, budget 320, 3 ranks for 3 steps with a checkpoint every
step, then `vidscale resume --nproc 5`. The old ranks straddle an epoch boundary and a new
rank gets samples of an earlier epoch but none of the latest; no sample of an unfinished
epoch may be trained twice or lost."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from vidscale.data.loader import remap_loader_states
from vidscale.data.shards import ShardWriter

from conftest import QUIET, cli_env, set_args, vidscale

pytestmark = pytest.mark.e2e


def _write_shards(root: Path, seed: int = 30) -> Path:
    """8 latents of 16..320 tokens in one shard; with seed 30 and budget 320 the three ranks'
    packings drift so that after 3 steps they are in epochs (2, 2, 1) and the remap to 5
    ranks leaves a new rank with nothing of epoch 2 (found by a search over seeds)."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    w = ShardWriter(root, max_bytes=rng.choice([20000, 60000, 10**7]), patch=(1, 2, 2))
    for i in range(8):
        T, H, W = rng.randint(1, 5), rng.choice([8, 12, 16, 20]), rng.choice([8, 12, 16, 20])
        while T * H * W // 4 > 320:
            T -= 1
        w.write(torch.randn(4, T, H, W, generator=g), torch.randn(4, 384, generator=g), {"caption": f"video {i}"})
    w.close(channels=4, text_dim=384)
    return root


def _records(run: Path) -> dict[int, list[dict]]:
    return {int(p.stem[2:]): [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
            for p in sorted((run / "consumed").glob("dp*.jsonl"))}


def test_resume_3_ranks_as_5_trains_every_sample_of_an_unfinished_epoch_once(tmp_path):
    src = _write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    over = set_args([*QUIET, f"data.source={src}", "train.tokens_per_batch=320", "train.steps=3",
                     "checkpoint.every=1", "data.record_consumed=true", "logging.every=1", "train.val_videos=2"])
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "3", *over, "--run-dir", run, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    old = _records(run)
    assert sorted(old) == [0, 1, 2] and all([x["step"] for x in recs] == [1, 2, 3] for recs in old.values()), old
    last = max(x["epoch"] for recs in old.values() for x in recs)
    # the case: a new rank holds samples of an earlier epoch but none of the latest
    states = [json.loads((run / f"checkpoints/step_00000003/loader/dp{k:05d}.json").read_text()) for k in range(3)]
    segs = [[(s["epoch"], s["ranges"])] + [(q["epoch"], q["ranges"]) for q in s["queue"]]
            for s in remap_loader_states(states, 5)]
    assert any(any(rg for e, rg in sg if e < last) and not any(rg for e, rg in sg if e == last) for sg in segs), segs

    r = vidscale("resume", run, "--nproc", "5", "--set", "train.steps=6", timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "now world 5 = dp 5 x sp 1" in r.stdout + r.stderr
    new = _records(run)
    assert sorted(new) == [0, 1, 2, 3, 4]
    for k in range(3):  # the old ranks' records up to the checkpoint are kept as they were
        assert [x for x in new[k] if x["step"] <= 3] == old[k]
    for k in range(5):  # every new rank trained steps 4..6 and left the unfinished epochs behind
        after = [x for x in new[k] if x["step"] > 3]
        assert sorted({x["step"] for x in after}) == [4, 5, 6] and after[-1]["epoch"] > last, (k, after)
    every = sorted(f"{json.loads((src / 'index.json').read_text())['shards'][0]['name']}:{key}"
                   for key in json.loads((src / "index.json").read_text())["shards"][0]["keys"])
    by_epoch: dict[int, list[str]] = {}
    for recs in new.values():
        for x in recs:
            by_epoch.setdefault(x["epoch"], []).extend(x["keys"])
    for e in range(last + 1):  # unfinished when the run stopped: every sample exactly once
        assert sorted(by_epoch[e]) == every, (e, Counter(by_epoch[e]))
    for e, keys in by_epoch.items():  # and no epoch, finished or not, trains a sample twice
        assert len(keys) == len(set(keys)), (e, Counter(keys))
