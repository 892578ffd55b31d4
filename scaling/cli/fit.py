"""`vidscale fit RESULTS.csv`: fit scaling laws (Chinchilla approaches 2 and 3) to a sweep.

The CSV needs columns params, tokens, loss; flops is optional (else C = 6 N D), and
status / budget / name are used when present (see scaling/study/fit.py for the outlier rule).
"""
from __future__ import annotations

import argparse
import json
import math

from vidscale.scaling.study.fit import fit, public, read_results
from vidscale.scaling.study.next_run import compute_optimal_recipe, write_recipe
from vidscale.scaling.study.report import write_summary_plot


def flops_arg(s: str) -> float:
    """A --budget: a finite positive number of FLOPs (argparse type)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a FLOPs number like 1e21, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite positive FLOPs number, got {s!r}")
    return v


def add_parser(sub):
    p = sub.add_parser("fit", help="fit scaling laws to a results CSV", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results CSV, e.g. SWEEP_DIR/results.csv")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="write the four plots into one PNG")
    p.add_argument("--budget", type=flops_arg, nargs="+", action="extend", default=[], metavar="C",
                   help="compute budget(s) in FLOPs to predict N_opt, D_opt and loss at")
    p.add_argument("--holdout", action="append", default=[], metavar="EXPR",
                   help="leave out the runs matching COLUMN OP VALUE (OP: >= <= > < =; e.g. 'budget>=4e10', "
                        "'name=h64d1-C4e10'; repeatable, a run matching any is held out) and report how well "
                        "the fit predicts them (--json keys holdout, holdout_mape)")
    p.add_argument("--write-recipe", metavar="OUT.yaml",
                   help="with one --budget: write the compute-optimal recipe for it (the sweep's aspect ratio, "
                        "steps for D_opt, lr and batch from the hyperparameter laws when fitted); "
                        "`vidscale train OUT.yaml` runs it")
    p.add_argument("--base", metavar="RECIPE", default="",
                   help="--write-recipe's template when the CSV does not come from a sweep directory")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> int:
    if args.write_recipe and len(args.budget) != 1:
        raise ValueError(f"--write-recipe {args.write_recipe}: give exactly one --budget (the compute to plan for)")
    rows = read_results(args.results)
    result = fit(rows, args.budget, bootstrap=args.bootstrap, seed=args.seed, where=args.results,
                 holdout=args.holdout)
    if args.plot:
        write_summary_plot(result, args.plot)
    if args.write_recipe:
        cfg, info = compute_optimal_recipe(result, rows, args.budget[0], base=args.base)
        out = write_recipe(cfg, info, args.write_recipe, args.results)
        result["recipe"] = {"path": str(out), **{k: info[k] for k in ("params", "steps", "lr", "tokens_per_batch")}}
    if args.json:
        print(json.dumps(public(result)))
        return 0
    print(summary(result))
    if args.plot:
        print(f"plots: {args.plot}")
    if args.write_recipe:
        r = result["recipe"]
        print(f"recipe: {r['path']} ({r['params']} parameters, {r['steps']} steps, lr {r['lr']:.3g}, "
              f"tokens_per_batch {r['tokens_per_batch']})")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def summary(result: dict) -> str:
    def ci(src, k=None):
        if k is None:
            src, k = result, src
        c = src["ci"].get(k)
        return f" [{c[0]:.4g}, {c[1]:.4g}]" if c else ""
    lines = [f"{result['n_runs']} runs; L(N, D) = E + A/N^alpha + B/D^beta (95% bootstrap CI)"]
    for k in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {k:>6} = {result[k]:.4g}{ci(k)}")
    lines.append(f"  N_opt ~ C^{result['a']:.3f}{ci('a')}   D_opt ~ C^{result['b']:.3f}{ci('b')}   (approach 3)")
    a2 = result["approach2"]
    if a2.get("a") is not None:
        lines.append(f"  N_opt ~ C^{a2['a']:.3f}   D_opt ~ C^{a2['b']:.3f}   (approach 2, "
                     f"{len(result['isoflop'])} IsoFLOP minima)")
    for p in result["predictions"]:
        lines.append(f"  C = {p['budget']:.3g}: N_opt = {p['N_opt']:.3g}, D_opt = {p['D_opt']:.3g}, "
                     f"loss = {p['loss']:.4f}")
    for key, law in (result.get("hparams") or {}).items():
        if law and law.get("c") is not None:
            terms = " ".join(f"{v}^{law[k]:.3f}{ci(law, k)}" for k, v in (("p_N", "N"), ("q_C", "C"))
                             if law.get(k) is not None)
            lines.append(f"  {key}_opt = {law['c']:.3g} {terms}   ({len(law['points'])} cells, "
                         f"{len(law['skipped'])} left out)")
    if result.get("holdout_exprs"):
        lines.append(f"  held out ({' or '.join(result['holdout_exprs'])}): {len(result['holdout'])} runs, "
                     f"mean |relative error| {_pct(result['holdout_mape'])}")
        for h in result["holdout"]:
            lines.append(f"    {h['name']}: predicted {h['predicted']:.4f}, actual {h['actual']:.4f} "
                         f"({h['rel_err']:+.2%})")
    for w in result.get("warnings", []):
        lines.append(f"  warning: {w}")
    if result["outliers"] or result["dropped"]:
        lines.append(f"  dropped: {[d['name'] for d in result['dropped']] + result['outliers']}")
    return "\n".join(lines)
