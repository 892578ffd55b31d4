"""`vidscale train --nproc N`: dp=2 x sp=2 trains the debug recipe from prepared shards,
a dead rank stops the whole run, and wrong layouts are one-line errors before any start."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, cli_env, vidscale, vidscale_cmd  # noqa: E402
from procs import alive, children  # noqa: E402

pytestmark = pytest.mark.e2e


def _env():
    return cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real webdataset shards: demo videos -> `vidscale prepare` (PyAV decode, latents, MiniLM)."""
    d = tmp_path_factory.mktemp("data")
    for cmd in (["make-videos", str(d / "videos"), "--n", "16"],
                ["prepare", str(d / "videos"), str(d / "shards"), "--recipe", "recipes/debug.yaml", "--no-progress"]):
        r = vidscale(*cmd, timeout=300, env=_env())
        assert r.returncode == 0, r.stderr[-2000:]
    return d / "shards"


@pytest.mark.dist
def test_dp2_sp2_trains_debug_recipe_from_shards(tmp_path, shards):
    run = tmp_path / "run"
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "4", "--run-dir", run,
                 "--set", "parallel.ulysses=2", "--set", f"data.source={shards}",
                 "--set", "train.steps=30", "--set", "logging.every=3", "--set", "checkpoint.every=0",
                 "--set", "logging.progress=false", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for rank in (1, 2, 3):  # other ranks' output goes to their logs
        assert (run / "logs" / f"rank{rank}.log").exists()


@pytest.mark.dist
def test_a_dead_rank_stops_the_run(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(vidscale_cmd("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run,
                                      "--set", "train.steps=100000", "--set", "logging.every=1",
                                      "--set", "logging.progress=false", "--set", "checkpoint.every=0",
                                      "--set", "train.tokens_per_batch=256"),
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert p.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        ranks = children(p.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies mid-run
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGKILL  # as the shell reports a process SIGKILL ended
    lines = [line for line in err.splitlines() if "rank 1 of 2 was killed by SIGKILL" in line]
    assert lines, err[-2000:]
    time.sleep(0.5)
    assert not any(alive(pid) for pid in ranks)  # rank 0 was stopped, not left hanging


@pytest.mark.parametrize("overrides,needle", [
    (["--nproc", "3", "--set", "parallel.ulysses=2"], "does not divide the world size 3"),
    (["--nproc", "4", "--set", "parallel.ulysses=4", "--set", "model.heads=6"], "does not divide the model's 6"),
    (["--nproc", "2", "--set", "parallel.zero_stage=0"], "parallel.zero_stage"),
])
def test_wrong_layouts_fail_in_one_line_before_start(tmp_path, overrides, needle):
    r = vidscale("train", "recipes/debug.yaml", "--run-dir", tmp_path / "x", *overrides, timeout=120, env=_env())
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "x").exists()  # nothing started
