"""`vidscale fit --budget C --write-recipe OUT.yaml`: the compute-optimal recipe of a sweep's
fit (shape family, steps for D_opt, lr from the fitted law) loads and trains as written."""
import csv
import json
import math

import pytest
import yaml

from conftest import DEBUG, read_losses, vidscale
from vidscale.models.sizes import param_count
from vidscale.scaling.config import load_config, model_config, save_config

pytestmark = pytest.mark.e2e

E, A, B, ALPHA, BETA = 0.5, 114.0, 40.0, 0.4, 0.4
TOKENS_PER_STEP = 200


def make_sweep(root, lr_axis=False):
    """A sweep directory as `vidscale sweep` leaves it (recipes/NAME.yaml, results.csv with
    run_dir), with losses from a known law: aspect 32, head width 16, depths 1..4."""
    base = load_config(DEBUG)
    rows = []
    for C in (1e9, 2e9, 4e9, 8e9):
        for depth in range(1, 5):
            cfg = load_config(DEBUG, [f"model.hidden={32 * depth}", f"model.depth={depth}",
                                      f"model.heads={2 * depth}"])
            n = param_count(model_config(cfg.model))
            steps = max(1, round(C / (6 * n) / TOKENS_PER_STEP))
            d = steps * TOKENS_PER_STEP
            for lr in ((5e-4, 1e-3, 2e-3) if lr_axis else (1e-3,)):
                lr_opt = 0.05 * n ** -0.4
                loss = E + A / n ** ALPHA + B / d ** BETA + (0.02 * math.log(lr / lr_opt) ** 2 if lr_axis else 0)
                name = f"h{32 * depth}d{depth}-C{C:.0e}" + (f"-lr{lr:g}" if lr_axis else "")
                run_dir = root / "runs" / name
                (root / "recipes").mkdir(parents=True, exist_ok=True)
                save_config(cfg, root / "recipes" / f"{name}.yaml")
                rows.append({"name": name, "params": n, "tokens": steps * TOKENS_PER_STEP, "flops": C, "loss": loss, "status": "done",
                             "wall_time": 1, "budget": C, "model": name.split("-")[0], "steps": steps,
                             "lr": lr, "tokens_per_batch": base.train.tokens_per_batch, "seed": 0, "run_dir": run_dir})
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "results.csv"


def test_written_recipe_is_the_fitted_optimum_and_trains(tmp_path):
    csv_path = make_sweep(tmp_path / "sweep")
    out = tmp_path / "next.yaml"
    r = vidscale("fit", csv_path, "--budget", "2e9", "--write-recipe", out, "--json", "--bootstrap", "30")
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)
    pred = fit["predictions"][0]
    cfg = load_config(out)
    m = model_config(cfg.model)
    assert m.hidden == 32 * m.depth and m.heads == m.hidden // 16  # the sweep's family
    n = param_count(m)
    assert fit["recipe"]["params"] == n and abs(math.log(n / pred["N_opt"])) < 0.35  # nearest shape of the family
    assert cfg.train.steps == round(pred["D_opt"] / TOKENS_PER_STEP)
    assert cfg.train.run_dir == "" and cfg.checkpoint.resume == "" and cfg.checkpoint.branch_from == ""
    text = out.read_text()
    assert f"{pred['loss']:.4f}" in text and "95% interval" in text  # the header: predicted loss and interval
    again = vidscale("fit", csv_path, "--budget", "2e9", "--write-recipe", out)
    assert again.returncode == 2 and "never overwrites" in again.stderr
    run = tmp_path / "run"
    t = vidscale("train", out, "--run-dir", run, "--set", "logging.progress=false")
    assert t.returncode == 0, t.stderr[-2000:]
    assert max(read_losses(run)) == cfg.train.steps


def test_lr_comes_from_the_fitted_law(tmp_path):
    csv_path = make_sweep(tmp_path / "sweep", lr_axis=True)
    out = tmp_path / "next.yaml"
    r = vidscale("fit", csv_path, "--budget", "2e9", "--write-recipe", out, "--json", "--bootstrap", "0")
    assert r.returncode == 0, r.stderr
    n = json.loads(r.stdout)["recipe"]["params"]
    assert load_config(out).optim.lr == pytest.approx(0.05 * n ** -0.4, rel=0.05)
    assert "from the fitted lr law" in out.read_text()


def test_write_recipe_needs_one_budget(tmp_path):
    r = vidscale("fit", tmp_path / "results.csv", "--write-recipe", tmp_path / "x.yaml")
    assert r.returncode == 2 and "exactly one --budget" in r.stderr and "\n" not in r.stderr.strip()
