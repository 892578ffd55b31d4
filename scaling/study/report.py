"""The sweep report: PNG plots of a fit (matplotlib, Agg) and `SWEEP_DIR/report.md`.

`write_sweep_report` fits a sweep's finished runs (`fit.py`), then writes SWEEP_DIR/fit.json
and the report. Plots take the dict of `fit.fit` (with its private bootstrap laws for the
bands): IsoFLOP curves with their parabolas, the compute-optimal frontier with its fit and
95% band, loss vs compute, and the residuals of the parametric fit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vidscale.scaling.study.fit import fit, optimum, public  # noqa: E402
from vidscale.scaling.study.hparams import predict  # noqa: E402

PLOTS = {"isoflop": "IsoFLOP curves", "frontier": "Compute-optimal frontier",
         "loss_vs_compute": "Loss vs compute", "residuals": "Residuals of the parametric fit"}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.{digits}e}"


def _law(result: dict) -> dict:
    return {k: result[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G", "k")}


def _budget_colors(result: dict):
    budgets = sorted({m["budget"] for m in result["isoflop"]} |
                     {s["budget"] for s in result["skipped_budgets"]})
    cmap = plt.get_cmap("viridis")
    return {b: cmap(i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}


def _compute_span(result: dict) -> np.ndarray:
    C = ([r["flops"] for r in result["residuals"]] + [p["budget"] for p in result["predictions"]]
         + [h["flops"] for h in result.get("holdout") or []])
    return np.logspace(math.log10(min(C)) - 0.3, math.log10(max(C)) + 0.3, 60)


def plot_isoflop(ax, result: dict) -> None:
    law = _law(result)
    res = result["residuals"]
    groups: dict[float, list[dict]] = {}
    for r in res:  # group runs by the nearest budget that approach 2 saw
        budgets = [m["budget"] for m in result["isoflop"]] + [s["budget"] for s in result["skipped_budgets"]]
        b = min(budgets, key=lambda c: abs(math.log(c / r["flops"]))) if budgets else r["flops"]
        groups.setdefault(b, []).append(r)
    colors = _budget_colors(result)
    minima = {m["budget"]: m for m in result["isoflop"]}
    for b, rs in sorted(groups.items()):
        c = colors.get(b, "k")
        N = np.array([r["params"] for r in rs])
        ax.scatter(N, [r["loss"] for r in rs], color=c, s=25, zorder=3, label=f"C = {b:.2g} FLOPs")
        xs = np.logspace(math.log10(N.min()), math.log10(N.max()), 50)
        if b in minima:
            ax.plot(xs, np.polyval(minima[b]["parabola"], np.log(xs)), color=c, lw=1.5)
            ax.scatter([minima[b]["N_opt"]], [minima[b]["loss"]], marker="*", s=140, color=c,
                       edgecolor="k", zorder=4)
        d = b / (law["k"] * xs)  # the parametric law along this IsoFLOP line
        ax.plot(xs, law["E"] + law["A"] / xs ** law["alpha"] + law["B"] / d ** law["beta"], color=c, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title("IsoFLOP curves (solid: parabola in log N, *: minimum; dotted: L(N, D) fit)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def _band(result: dict, Cs: np.ndarray, which: int):
    boots = result.get("_boot_laws") or []
    if len(boots) < 10:
        return None
    vals = np.array([[optimum(p, c)[which] for c in Cs] for p in boots])
    vals[~np.isfinite(vals)] = np.nan  # a degenerate resample's optimum at 0 or infinity: no estimate
    if np.isnan(vals).all(axis=0).any():
        return None
    return np.nanpercentile(vals, 2.5, axis=0), np.nanpercentile(vals, 97.5, axis=0)


def plot_frontier(axes, result: dict) -> None:
    law = _law(result)
    Cs = _compute_span(result)
    a2 = result["approach2"]
    for ax, which, key, label in ((axes[0], 0, "N_opt", "parameters N_opt"), (axes[1], 1, "D_opt", "tokens D_opt")):
        exp3 = law["a"] if which == 0 else law["b"]
        ax.plot(Cs, [optimum(law, c)[which] for c in Cs], color="C0", lw=2,
                label=f"approach 3: ~ C^{exp3:.3f}")
        band = _band(result, Cs, which)
        if band is not None:
            ax.fill_between(Cs, band[0], band[1], color="C0", alpha=0.2, label="95% bootstrap band")
        if result["isoflop"]:
            ax.scatter([m["budget"] for m in result["isoflop"]], [m[key] for m in result["isoflop"]],
                       color="C1", marker="*", s=120, edgecolor="k", zorder=4, label="IsoFLOP minima")
        if a2.get("a") is not None:
            e, lc = (a2["a"], a2["log_cN"]) if which == 0 else (a2["b"], a2["log_cD"])
            ax.plot(Cs, np.exp(lc) * Cs ** e, color="C1", ls="--", label=f"approach 2: ~ C^{e:.3f}")
        for p in result["predictions"]:
            ax.scatter([p["budget"]], [p[key]], color="C3", marker="D", zorder=5)
            ax.annotate(f"{p[key]:.2g}", (p["budget"], p[key]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("Compute-optimal model size", fontsize=9)
    axes[1].set_title("Compute-optimal training tokens", fontsize=9)


def plot_loss_vs_compute(ax, result: dict) -> None:
    law = _law(result)
    res = result["residuals"]
    N = np.array([r["params"] for r in res])
    sc = ax.scatter([r["flops"] for r in res], [r["loss"] for r in res], c=np.log10(N), cmap="plasma", s=25, zorder=3)
    plt.colorbar(sc, ax=ax, label="log10 parameters")
    Cs = _compute_span(result)
    ax.plot(Cs, [optimum(law, c)[2] for c in Cs], color="k", lw=1.5, label="compute-optimal loss (approach 3)")
    band = _band(result, Cs, 2)
    if band is not None:
        ax.fill_between(Cs, band[0], band[1], color="k", alpha=0.15, label="95% bootstrap band")
    ax.axhline(law["E"], color="gray", ls=":", label=f"irreducible E = {law['E']:.3g}")
    held = result.get("holdout") or []
    if held:  # runs the fit never saw: actual (open) against predicted (x), joined
        for h in held:
            ax.plot([h["flops"]] * 2, [h["actual"], h["predicted"]], color="C3", lw=0.8, zorder=2)
        ax.scatter([h["flops"] for h in held], [h["actual"] for h in held], facecolors="none", edgecolors="C3",
                   s=40, zorder=4, label=f"held out: actual (MAPE {result['holdout_mape']:.1%})")
        ax.scatter([h["flops"] for h in held], [h["predicted"] for h in held], marker="x", color="C3", s=30,
                   zorder=4, label="held out: predicted")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss")
    ax.set_title("Loss vs compute", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def plot_residuals(axes, result: dict) -> None:
    res = result["residuals"]
    r = np.array([x["log_residual"] for x in res])
    for ax, key, label in ((axes[0], "params", "parameters N"), (axes[1], "flops", "training compute C (FLOPs)")):
        ax.scatter([x[key] for x in res], r, s=20, color="C2")
        ax.axhline(0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("log(loss) - log(fit)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"Residuals (RMS {math.sqrt(float(np.mean(r ** 2))):.2e} in log loss)", fontsize=9)


HPARAM_PLOTS = {"lr": ("optimal learning rate", "hparams_lr"), "batch": ("optimal batch (tokens)", "hparams_batch")}


def plot_hparam(ax, law: dict, label: str) -> None:
    """Each cell's optimum against compute, one colour per model size, and the fitted law."""
    pts = law["points"]
    sizes = sorted({p["params"] for p in pts})
    cmap = plt.get_cmap("plasma")
    Cs = np.logspace(math.log10(min(p["budget"] for p in pts)) - 0.2, math.log10(max(p["budget"] for p in pts)) + 0.2, 40)
    for i, n in enumerate(sizes):
        col = cmap(i / max(1, len(sizes) - 1))
        mine = [p for p in pts if p["params"] == n]
        ax.scatter([p["budget"] for p in mine], [p["opt"] for p in mine], color=col, s=25, zorder=3,
                   label=f"N = {n:.3g}")
        if law.get("c") is not None:
            ax.plot(Cs, [predict(law, n, c) for c in Cs], color=col, lw=1)
    exps = " ".join(f"{v}^{law[k]:.3f}" for k, v in (("p_N", "N"), ("q_C", "C")) if law.get(k) is not None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} ~ {exps}" if exps else label, fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)


def write_plots(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """One PNG per plot in out_dir; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, (label, name) in HPARAM_PLOTS.items():
        law = (result.get("hparams") or {}).get(key)
        if law and law.get("points"):
            fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.5))
            plot_hparam(ax, law, label)
            fig.tight_layout()
            paths[name] = out_dir / f"{name}.png"
            fig.savefig(paths[name], dpi=110)
            plt.close(fig)
    for name in PLOTS:
        two = name in ("frontier", "residuals")
        fig, ax = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6.5, 4.5))
        {"isoflop": plot_isoflop, "frontier": plot_frontier, "loss_vs_compute": plot_loss_vs_compute,
         "residuals": plot_residuals}[name](ax, result)
        fig.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def write_summary_plot(result: dict, path: str | Path) -> Path:
    """All four plots in one PNG (`vidscale fit --plot OUT.png`)."""
    fig = plt.figure(figsize=(13, 13))
    gs = fig.add_gridspec(3, 2)
    plot_isoflop(fig.add_subplot(gs[0, 0]), result)
    plot_loss_vs_compute(fig.add_subplot(gs[0, 1]), result)
    plot_frontier([fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])], result)
    plot_residuals([fig.add_subplot(gs[2, 0]), fig.add_subplot(gs[2, 1])], result)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _ci(result: dict, key: str) -> str:
    ci = result["ci"].get(key)
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


def _hparam_lines(result: dict) -> list[str]:
    hp = result.get("hparams") or {}
    if not any(hp.values()):
        return []
    lines = ["", "## Hyperparameter laws", "",
             "Per cell, the optimum of a parabola in log lr (log batch); then opt = c N^p C^q by least squares "
             "in log space (95% bootstrap intervals).", "", "| law | c | p (N) | q (C) | cells | left out |",
             "|---|---|---|---|---|---|"]
    for key, law in hp.items():
        if not law:
            continue
        ci = law.get("ci", {})

        def cell(k):
            v, c = law.get(k), ci.get(k)
            return "-" if v is None else f"{_fmt(v, 3)}" + (f" [{_fmt(c[0])}, {_fmt(c[1])}]" if c else "")
        lines.append(f"| {key}_opt | {cell('c')} | {cell('p_N')} | {cell('q_C')} | {len(law['points'])} | "
                     f"{len(law['skipped'])} |")
    return lines


def _runs_table(rows: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| name | params | tokens | FLOPs | loss | status | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('name', '')} | {r.get('params', '')} | {r.get('tokens', '')} | {r.get('flops', '')} | "
                     f"{r.get('loss', '')} | {r.get('status', '')} | {r.get('wall_time', '')} |")
    return lines


def write_report(sweep_dir: str | Path, result: dict | None, rows: list[dict], title: str = "Scaling-law sweep",
                 notes: list[str] = ()) -> Path:
    """SWEEP_DIR/report.md with the fit, its intervals, predictions, the runs and the plots."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if result is None:  # too few finished runs: the table only
        lines = [f"# {title}", "", *notes, ""] + _runs_table(rows)
        out = sweep_dir / "report.md"
        out.write_text("\n".join(lines) + "\n")
        return out
    paths = write_plots(result, sweep_dir / "plots")
    a2 = result["approach2"]
    lines = [f"# {title}", "", *notes, "",
             f"{result['n_runs']} runs fitted (C = k N D with k = {result['k']:.3g} FLOPs per parameter-token; "
             f"{result['bootstrap']} bootstrap resamples within each budget; 95% intervals).", "",
             *[f"**Warning**: {w}." for w in result.get("warnings", [])], "",
             "## Parametric fit (approach 3)", "",
             "L(N, D) = E + A / N^alpha + B / D^beta, Huber (delta "
             f"{result['huber_delta']:g}) on log loss, L-BFGS-B from variable-projection starts.", "",
             "| parameter | value | 95% CI |", "|---|---|---|"]
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lines.append(f"| {k} | {_fmt(result[k], 4)} | {_ci(result, k)} |")
    lines += ["", "a: N_opt ~ C^a; b: D_opt ~ C^b.", "", "## IsoFLOP profiles (approach 2)", ""]
    if a2.get("a") is not None:
        ca, cb = a2["ci"]["a"], a2["ci"]["b"]
        lines.append(f"N_opt ~ C^{a2['a']:.3f} (95% CI {[round(x, 3) for x in ca] if ca else '-'}), "
                     f"D_opt ~ C^{a2['b']:.3f} (95% CI {[round(x, 3) for x in cb] if cb else '-'}).")
    else:
        lines.append("Not enough budgets with an interior minimum for a power law (need 2).")
    lines += ["", "| budget (FLOPs) | N_opt | D_opt | loss at minimum |", "|---|---|---|---|"]
    lines += [f"| {m['budget']:.3g} | {m['N_opt']:.3g} | {m['D_opt']:.3g} | {m['loss']:.4f} |"
              for m in result["isoflop"]]
    lines += [f"| {s['budget']:.3g} | skipped: {s['reason']} | | |" for s in result["skipped_budgets"]]
    if result["predictions"]:
        lines += ["", "## Predictions", "", "| budget (FLOPs) | N_opt | D_opt | loss | N_opt (approach 2) |",
                  "|---|---|---|---|---|"]
        for p in result["predictions"]:
            n_ci = p["ci"]["N_opt"]
            lines.append(f"| {p['budget']:.3g} | {p['N_opt']:.3g} "
                         f"{'[' + _fmt(n_ci[0]) + ', ' + _fmt(n_ci[1]) + ']' if n_ci else ''} | {p['D_opt']:.3g} | "
                         f"{p['loss']:.4f} | {_fmt(p.get('approach2', {}).get('N_opt'))} |")
    if result.get("holdout_exprs"):
        mape = result["holdout_mape"]
        lines += ["", "## Held-out runs", "",
                  f"Left out of the fit ({' or '.join(f'`{e}`' for e in result['holdout_exprs'])}) and predicted "
                  f"from it: mean |relative error| {'-' if mape is None else f'{mape:.2%}'}.", "",
                  "| run | predicted loss | actual loss | relative error |", "|---|---|---|---|"]
        lines += [f"| {h['name']} | {h['predicted']:.4f} | {h['actual']:.4f} | {h['rel_err']:+.2%} |"
                  for h in result["holdout"]]
    lines += ["", "## Outliers", "", f"Rule: {result['outlier_rule']}.", ""]
    dropped = [f"{d['name']} ({d['reason']})" for d in result["dropped"]] + \
              [f"{n} (residual)" for n in result["outliers"]]
    lines.append("Dropped: " + (", ".join(dropped) if dropped else "none") + ".")
    lines += _hparam_lines(result)
    lines += ["", "## Plots", ""]
    titles = {**PLOTS, **{name: f"Law of the {label}" for label, name in HPARAM_PLOTS.values()}}
    for name, p in paths.items():
        lines += [f"### {titles[name]}", "", f"![{titles[name]}]({p.relative_to(sweep_dir)})", ""]
    lines += _runs_table(rows)
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def write_sweep_report(sweep, rows: list[dict], budgets: list[float], bootstrap: int) -> Path:
    """Fit the finished runs of a sweep (at least 5) and write SWEEP_DIR/fit.json and report.md;
    predictions at `budgets` (default 10x and 100x the largest budget that finished)."""
    done = [r for r in rows if r["status"] == "done"]
    # no fit this time: a fit.json of an earlier report would be read as this one's
    (sweep.dir / "fit.json").unlink(missing_ok=True)
    notes = [f"Sweep `{sweep.path}` (base recipe `{sweep.base}`), {len(done)}/{len(rows)} runs done. "
             f"Loss: the deterministic validation loss of each run (`scaling/train/evaluate.py`)."]
    if len(done) < 5:
        return write_report(sweep.dir, None, rows, title=f"Sweep {sweep.args.name}",
                            notes=notes + [f"No fit: {len(done)} finished runs, a fit needs at least 5."])
    largest = max(float(r["budget"]) for r in done)
    budgets = budgets or [10 * largest, 100 * largest]
    try:
        result = fit(rows, budgets, bootstrap=bootstrap, where=str(sweep.dir / "results.csv"),
                     holdout=sweep.args.holdout)
    except ValueError as e:
        return write_report(sweep.dir, None, rows, title=f"Sweep {sweep.args.name}",
                            notes=notes + [f"No fit: {e}"])
    (sweep.dir / "fit.json").write_text(json.dumps(public(result), indent=1))
    return write_report(sweep.dir, result, rows, title=f"Sweep {sweep.args.name}", notes=notes)
