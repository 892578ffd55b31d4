"""The sweep runner's bookkeeping, without training: what it says about a run that ended, and
what it refuses to reuse from a sweep directory."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidscale.scaling.config import load_config, save_config
from vidscale.scaling.study.plan import load_sweep, plan
from vidscale.scaling.study.runner import Runner, run_sweep

from conftest import write_two_run_sweep  # noqa: E402


def test_run_that_exits_0_without_final_json_says_so(tmp_path, capsys):
    """A run process that ends well but writes no final.json is failed with that reason, not
    with a tail of its log that says nothing about it."""
    sweep = load_sweep(write_two_run_sweep(tmp_path))
    runs = plan(sweep)
    r = Runner(sweep, runs, "local", "", 1, 60.0)
    (r.dir / "logs").mkdir(parents=True)
    (r.dir / "logs" / f"{runs[0].name}.log").write_text("step 3/3 loss 0.9\n")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    r.running[runs[0].name] = (proc, time.time(), runs[0])
    r.poll()
    out = capsys.readouterr().out
    assert f"FAILED {runs[0].name}: exited 0 without final.json" in out and "step 3/3" not in out
    assert r.ledger.state[runs[0].name]["status"] == "failed"


def _finish(sweep, run) -> None:
    """What a finished run leaves in its run dir: the recipe `vidscale train` trained (the
    sweep's resolved recipe with the launcher set), and final.json."""
    recipe = sweep.dir / "recipes" / f"{run.name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, recipe)
    run_dir = Path(run.cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    save_config(load_config(recipe, values={"cluster.launcher": "local"}), run_dir / "config.yaml")
    (run_dir / "final.json").write_text(json.dumps({"val_loss": 1.0, "params": run.params, "tokens": 100,
                                                    "flops": run.flops, "steps": run.steps}))


@pytest.mark.parametrize("old, new, key", [('"optim.lr": 0.001', '"optim.lr": 0.002', "optim.lr"),
                                            ("min_steps: 3", "min_steps: 3\nschedule: wsd-branches", "optim."),
                                            ('"train.tokens_per_batch": 512', '"train.tokens_per_batch": 1024',
                                             "steps")])
def test_finished_runs_of_another_recipe_are_refused(tmp_path, old, new, key):
    """Rerunning a finished sweep reuses its runs; after a change of what they train it refuses,
    naming the run and the key, before it writes anything (plan.json, cost.json stay)."""
    path = write_two_run_sweep(tmp_path, set={"optim.lr": 0.001})
    sweep = load_sweep(path)
    runs = plan(sweep)
    for r in runs:
        _finish(sweep, r)
    rows = run_sweep(sweep, runs)  # the same plan: every run is reused
    assert [r["status"] for r in rows] == ["done", "done"] and [r["lr"] for r in rows] == ["0.001", "0.001"]
    before = {f: (sweep.dir / f).read_text() for f in ("plan.json", "cost.json", "results.csv")}
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    sweep2 = load_sweep(path)
    runs2 = plan(sweep2)
    assert [r.name for r in runs2] == [r.name for r in runs]
    assert ([r.steps for r in runs2] == [r.steps for r in runs]) == (key != "steps")
    with pytest.raises(ValueError) as e:
        run_sweep(sweep2, runs2)
    assert {f: (sweep.dir / f).read_text() for f in before} == before
    msg = str(e.value)
    assert "\n" not in msg and runs[0].name in msg and key in msg and "sweep directory" in msg


def test_another_sweep_file_is_refused_from_a_sweep_dir(tmp_path):
    """Two sweep files that name one sweep dir (as two files without `name:` do by default):
    the second is refused before it writes anything; the first may run again, edited or not."""
    first = write_two_run_sweep(tmp_path, file="a.yaml")
    second = write_two_run_sweep(tmp_path, file="b.yaml", hidden=(32, 64))
    sweep = load_sweep(first)
    runs = plan(sweep)
    for r in runs:
        _finish(sweep, r)
    run_sweep(sweep, runs)
    plan_json = (sweep.dir / "plan.json").read_text()
    other = load_sweep(second)
    assert other.dir == sweep.dir
    with pytest.raises(ValueError, match=r"belongs to another sweep .*a\.yaml.*b\.yaml") as e:
        run_sweep(other, plan(other))
    assert "\n" not in str(e.value) and (sweep.dir / "plan.json").read_text() == plan_json
    first.write_text(first.read_text() + "gpu_peak_tflops: 989\n")  # edited: still its own sweep
    again = load_sweep(first)
    assert [r["status"] for r in run_sweep(again, plan(again))] == ["done", "done"]
