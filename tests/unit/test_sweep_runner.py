"""The sweep runner's bookkeeping, without training: what it says about a run that ended, and
what it refuses to reuse from a sweep directory."""
import subprocess
import sys
import time

from vidscale.scaling.study.plan import load_sweep, plan
from vidscale.scaling.study.runner import Runner

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
