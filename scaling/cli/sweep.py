"""`vidscale sweep SWEEP.yaml`: run an IsoFLOP sweep, then fit it and write its report.

Every run is a `vidscale train` of a resolved recipe (SWEEP_DIR/recipes/NAME.yaml) in its
own process, through the launcher asked for: local runs go one after another; on Ray they
share one cluster (an embedded local one unless --address) and run concurrently, as many
as its CPUs hold; on Slurm they are one job array, a task per unfinished run (with
`schedule: wsd-branches` one array per wave: the trunks, then the branches their
checkpoints made ready). A run is finished when RUN_DIR/final.json exists (written
atomically after its validation loss): rerunning the same command skips finished runs and
restarts the others with checkpoint.resume=auto, so they continue from their latest
complete checkpoint; a finished run whose recipe the sweep file has since changed, or a
sweep directory of another sweep file, stops it with one line. SWEEP_DIR/results.csv is
rewritten at every change; at the end the fit (`scaling/study/fit.py`) and
SWEEP_DIR/report.md with its plots.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from vidscale.scaling.cli.fit import flops_arg
from vidscale.scaling.config import LAUNCHERS, ClusterArgs
from vidscale.scaling.study.plan import cost, load_sweep, plan
from vidscale.scaling.study.report import write_sweep_report
from vidscale.scaling.study.runner import run_sweep
from vidscale.scaling.train.signals import stop_on


def add_parser(sub):
    p = sub.add_parser("sweep", help="run a scaling-law sweep, fit it, write its report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file, e.g. recipes/sweeps/tiny.yaml")
    p.add_argument("--launcher", choices=LAUNCHERS, default=ClusterArgs.launcher,
                   help="local: one run after another here; ray: concurrent runs on a Ray cluster; "
                        "slurm: a job array, a task per run (wsd-branches: one array per wave)")
    p.add_argument("--address", default="", help="Ray cluster address (default: an embedded local cluster)")
    p.add_argument("--cpus", type=int, default=0, help="Ray: CPUs of the embedded cluster (default: all)")
    p.add_argument("--sweep-dir", help="override the sweep's sweep_dir")
    p.add_argument("--budget", type=flops_arg, nargs="+", action="extend", default=[], metavar="C",
                   help="predict the optimum at these budgets in the report (default 10x, 100x the largest)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the fit's intervals")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, tokens, FLOPs per run) and stop")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    return p


def run(args) -> int:
    sweep = load_sweep(args.sweep)
    if args.sweep_dir:
        sweep.dir = Path(args.sweep_dir).absolute()
    runs = plan(sweep)
    if args.dry_run:
        print(dry_run(sweep, runs))
        return 0
    # `kill` (SIGTERM) or a closed terminal (SIGHUP) stops the sweep like Ctrl-C: its runs and
    # an embedded Ray cluster are stopped too, never orphaned; the exit status is 128 + signal
    stop_on(signal.SIGTERM, signal.SIGHUP)
    rows = run_sweep(sweep, runs, args.launcher, args.address, args.cpus, args.progress_every)
    failed = [r["name"] for r in rows if r["status"] != "done"]
    report = write_sweep_report(sweep, rows, args.budget, args.bootstrap)
    fitted = sweep.dir / "fit.json"
    if sweep.args.holdout and fitted.is_file():
        held = json.loads(fitted.read_text())
        if held.get("holdout_mape") is not None:
            print(f"held out ({' or '.join(sweep.args.holdout)}): {len(held['holdout'])} runs predicted by the fit "
                  f"of the others with mean |relative error| {held['holdout_mape']:.2%}")
    print(f"results: {sweep.dir / 'results.csv'}")
    print(f"report: {report}")
    print(f"TensorBoard: tensorboard --logdir {sweep.dir / 'runs'}")
    if failed:
        print(f"vidscale sweep: {len(failed)} run(s) did not finish: {failed} (rerun the same command to "
              f"resume them)", file=sys.stderr)
        return 1
    return 0


def dry_run(sweep, runs) -> str:
    """The plan as a table: each run's size, length and the FLOPs it trains itself (a branch
    only its cooldown), GPU-hours when the sweep names its GPUs, and the totals."""
    a = sweep.args
    gpu = a.gpu_peak_tflops * 1e12 * a.assumed_mfu
    head = f"{'run':<30} {'params':>10} {'steps':>7} {'tokens':>10} {'FLOPs':>10} {'trains':>10}"
    lines = [head + (f" {'GPU-h':>8}" if gpu else "") + "  from"]
    for r in runs:
        line = (f"{r.name:<30} {r.params:>10} {r.steps:>7} {r.tokens:>10.3g} {r.flops:>10.3g} "
                f"{r.spent_flops:>10.3g}")
        if gpu:
            line += f" {r.spent_flops / gpu / 3600:>8.3g}"
        lines.append(line + (f"  {r.trunk} @ step {r.branch_step}" if r.trunk else "  scratch"))
    c = cost(runs)
    lines.append(f"total: {len(runs)} runs ({c['branches']} branches), {c['sweep_flops']:.3g} FLOPs trained; "
                 f"as independent runs {c['grid_flops']:.3g} (ratio {c['sweep_flops_ratio']:.3f})")
    if gpu:
        lines.append(f"GPU-hours at {a.gpu_peak_tflops:g} TFLOP/s peak and {a.assumed_mfu:.0%} MFU: "
                     f"{c['sweep_flops'] / gpu / 3600:.4g}")
    return "\n".join(lines)
