"""Two data-parallel processes (gloo, DeepSpeed) train from shards of which one is truncated:
the rank that loses samples skips and counts them, and neither rank waits for the other."""
import json

import pytest

from conftest import cli_env, set_args, truncate, vidscale, write_shards  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def test_truncated_shard_never_leaves_a_rank_waiting(tmp_path):
    src = write_shards(tmp_path / "s", n=24, max_bytes=20000)
    index = json.loads((src / "index.json").read_text())
    assert len(index["shards"]) >= 2
    for s in index["shards"][1:]:  # keep shard 0 whole: the ranks lose different numbers of samples
        truncate(src / s["name"], 0.4)
    run = tmp_path / "run"
    env = cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run,
                 *set_args([f"data.source={src}", "parallel.zero_stage=1", "train.tokens_per_batch=64",
                            "data.lookahead=4", "train.steps=8", "logging.every=1", "checkpoint.every=0",
                            "logging.progress=false", "parallel.timeout_s=120"]), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    logs = r.stderr + "".join(p.read_text() for p in (run / "logs").glob("*.log")) if (run / "logs").exists() \
        else r.stderr
    assert "data: skipped" in logs
