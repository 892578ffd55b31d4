"""Sweep files: one-line errors, and run lengths from the FLOPs model over the runs' own batches."""
from pathlib import Path

import pytest

from vidscale.scaling.config import RecipeError, model_config
from vidscale.scaling.study.plan import PROBE_BATCHES, load_sweep, plan
from vidscale.scaling.train.flops import forward_flops, train_flops

from conftest import loader_for, write_sweep  # noqa: E402


def _err(tmp_path, text):
    with pytest.raises(RecipeError) as e:
        load_sweep(write_sweep(tmp_path, text, "bad.yaml"))
    msg = str(e.value)
    assert "\n" not in msg and "bad.yaml" in msg
    return msg


def test_sweep_mistakes_are_one_line_errors(tmp_path):
    assert "budgets" in _err(tmp_path, "models: [debug]\nbudgets: []\n")
    assert "budgets" in _err(tmp_path, "models: [debug]\nbudgets: [-1e9]\n")
    assert "model.size" in _err(tmp_path, "models: [huge]\nbudgets: [1e10]\n")
    assert "modls" in _err(tmp_path, "modls: [debug]\nbudgets: [1e10]\n")
    assert "aspect" in _err(tmp_path, "depths: [2]\nbudgets: [1e10]\n")
    assert "cells[0].model" in _err(tmp_path, "models: [debug]\nbudgets: [1e10]\ncells: [{model: nope, lr: 1e-3}]\n")
    assert "train.stpes" in _err(tmp_path, "models: [debug]\nbudgets: [1e10]\nset: {train.stpes: 3}\n")
    assert "divisible" in _err(tmp_path, "models: [{hidden: 96, depth: 1, heads: 5}]\nbudgets: [1e10]\n")


def test_budget_too_small_for_a_run(tmp_path):
    s = load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1e3]\n"))
    with pytest.raises(RecipeError, match="min_steps"):
        plan(s)


def test_steps_follow_from_the_flops_model(tmp_path):
    """steps = round(budget / E[FLOPs of a step]), E over the run's own packed batches."""
    s = load_sweep(write_sweep(tmp_path, """
models: [tiny, {name: narrow, hidden: 64, depth: 2}]
aspect: 32
depths: [1]
budgets: [1e11, 3e11]
tokens_per_batch: [512]
lr: [1e-3]
cells: [{model: narrow, budget: 3e11, lr: 3e-3}]
"""))
    runs = plan(s)
    # sorted by budget, then parameters; the lr is in the name once a cell sets one
    assert [r.name for r in runs] == ["h32d1-C1e11-lr0.001", "narrow-C1e11-lr0.001", "tiny-C1e11-lr0.001",
                                      "h32d1-C3e11-lr0.001", "narrow-C3e11-lr0.003", "tiny-C3e11-lr0.001"]
    by = {(r.model, r.budget): r for r in runs}
    assert len(runs) == 6 and by[("narrow", 3e11)].lr == 3e-3 and by[("narrow", 1e11)].lr == 1e-3
    for r in runs:
        cfg = r.cfg
        loader = loader_for(cfg)
        mcfg = model_config(cfg.model)
        per_batch = sum(train_flops(mcfg, next(loader)[1]) for _ in range(PROBE_BATCHES)) / PROBE_BATCHES
        assert r.steps == round(r.budget / per_batch), r.name
        assert r.flops == pytest.approx(r.budget, rel=0.5 / r.steps + 1e-9)
        assert cfg.train.steps == r.steps and cfg.checkpoint.resume == "auto"
        assert cfg.train.tokens_per_batch == 512 and Path(cfg.train.run_dir) == s.dir / "runs" / r.name
    # IsoFLOP: 3x the budget is 3x the steps; a bigger model gets fewer steps
    assert by[("tiny", 3e11)].steps == pytest.approx(3 * by[("tiny", 1e11)].steps, abs=2)
    assert by[("h32d1", 1e11)].params < by[("tiny", 1e11)].params
    assert by[("h32d1", 1e11)].steps > by[("tiny", 1e11)].steps
    # attention is in the count: its quadratic term is over 1% of a step here
    r = by[("tiny", 1e11)]
    loader = loader_for(r.cfg)
    metas = [next(loader)[1] for _ in range(PROBE_BATCHES)]
    mcfg = model_config(r.cfg.model)
    attn = sum(3 * (sum(forward_flops(mcfg, [e - s for s, e in m.segments()],
                                         [m.text_bounds[i + 1] - m.text_bounds[i] for i in range(m.num_videos)],
                                         m.num_videos, split=True)[k] for k in ("attention_core",))) for m in metas)
    assert attn > 0.01 * r.flops / r.steps * PROBE_BATCHES


def test_wsd_branches_share_one_trunk_per_line(tmp_path):
    """schedule: wsd-branches: per model (and lr), the largest budget's run is the trunk; every
    other run branches from the trunk's checkpoint at its own cooldown's first step."""
    from vidscale.scaling.study.plan import cost
    from vidscale.scaling.train.engine import decay_start
    s = load_sweep(write_sweep(tmp_path, """
models: [{hidden: 32, depth: 1}, {hidden: 48, depth: 1}]
budgets: [1e10, 2e10, 4e10]
lr: [1e-3, 2e-3]
schedule: wsd-branches
set: {optim.warmup: 6, optim.decay_fraction: 0.25}
"""))
    runs = plan(s)
    assert len(runs) == 12
    by = {r.name: r for r in runs}
    for r in runs:
        assert r.cfg.optim.schedule == "wsd"
        line = [x for x in runs if (x.model, x.lr) == (r.model, r.lr)]
        trunk = max(line, key=lambda x: x.steps)
        assert r.cfg.optim.warmup == min(x.cfg.optim.warmup for x in line)  # one warmup per line
        if r is trunk:
            assert r.trunk == "" and r.branch_step == 0 and r.cfg.checkpoint.branch_from == ""
            assert r.cfg.checkpoint.keep_steps == sorted(x.branch_step for x in line if x is not r)
            assert r.spent_flops == r.flops
        else:
            assert by[r.trunk] is trunk
            assert r.branch_step == decay_start(r.cfg.optim.warmup, r.steps, 0.25)
            assert r.cfg.checkpoint.branch_from == f"{trunk.cfg.train.run_dir}/checkpoints/step_{r.branch_step:08d}"
            assert r.spent_flops == pytest.approx(r.flops * (r.steps - r.branch_step) / r.steps)
    c = cost(runs)
    assert c["branches"] == 8 and c["grid_flops"] == pytest.approx(sum(r.flops for r in runs))
    assert c["sweep_flops_ratio"] == pytest.approx(sum(r.spent_flops for r in runs) / c["grid_flops"])
    assert 0.55 < c["sweep_flops_ratio"] < 0.7  # budgets 1:2:4: (4 + 0.25 x 3) / 7 = 0.68 at most


def test_unknown_sweep_schedule_is_one_line(tmp_path):
    assert "schedule" in _err(tmp_path, "models: [debug]\nbudgets: [1e10]\nschedule: branches\n")


@pytest.mark.parametrize("setting, key", [("train.val_videos: 0", "train.val_videos"), ("task: vae", "task")])
def test_sweep_without_a_validation_loss_is_refused(tmp_path, setting, key):
    """A run finishes when its validation loss writes final.json: a sweep that would write none
    (no validation videos, or a VAE) would train every run and mark it failed, for ever."""
    msg = _err(tmp_path, f"models: [debug]\nbudgets: [1e10]\nset: {{{setting}}}\n")
    assert f"key '{key}'" in msg


def test_set_strings_are_kept_exactly(tmp_path):
    """A string in `set:` is the value, never YAML to re-read: `#` starts no comment, 'null'
    and 'true' stay strings."""
    from vidscale.scaling.study.plan import _base_config
    data = tmp_path / "data" / "run #2"
    s = load_sweep(write_sweep(tmp_path, f'models: [debug]\nbudgets: [1e10]\n'
                                         f'set: {{data.source: "{data}", name: "null", cluster.address: "true"}}\n'))
    cfg = _base_config(s)
    assert cfg.data.source == str(data) and cfg.name == "null" and cfg.cluster.address == "true"


@pytest.mark.parametrize("grid", ["budgets: [1.2e11, 1.23e11]", "budgets: [1e11, 1e11]",
                                  "budgets: [1e11]\nseeds: [0, 0]"])
def test_runs_that_would_share_a_name_are_one_line(tmp_path, grid):
    """Run names are a contract (a sweep dir finds its runs by them): two runs of one name are
    an error naming it, never one run dir for both."""
    s = load_sweep(write_sweep(tmp_path, f"models: [debug]\n{grid}\n", "bad.yaml"))
    with pytest.raises(RecipeError) as e:
        plan(s)
    msg = str(e.value)
    assert "\n" not in msg and "bad.yaml" in msg and "both named debug-C1" in msg


def test_run_names_keep_their_format(tmp_path):
    s = load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1.2e11, 3e11]\nlr: [1e-3, 2e-3]\nseeds: [0, 1]\n"))
    assert [r.name for r in plan(s)][:4] == ["debug-C1.2e11-lr0.001-s0", "debug-C1.2e11-lr0.001-s1",
                                             "debug-C1.2e11-lr0.002-s0", "debug-C1.2e11-lr0.002-s1"]
