"""Scaling-law fits of a sweep's final losses (Hoffmann et al. 2022, "Chinchilla").

Approach 2 (IsoFLOP profiles): for each compute budget, a parabola of loss in log N; its
vertex is that budget's compute-optimal N*. Power laws N* = c_N C^a and D* = c_D C^b are
then least-squares lines in log-log space through the vertices.

Approach 3 (parametric): L(N, D) = E + A / N^alpha + B / D^beta, fitted on log loss,
    log L_hat = logsumexp(log E, log A - alpha log N, log B - beta log D),
with a Huber loss (delta 1e-3) on the log residuals, minimised by L-BFGS-B from the best
starts of a variable-projection grid: for fixed (alpha, beta) the model is linear in
(E, A, B), solved by non-negative least squares on relative residuals, which is what makes
the grid cheap enough to be dense. Under C = k N D the optimum is
    N_opt = G (C/k)^a, D_opt = (C/k)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta), b = alpha / (alpha + beta).
k is 6 without a flops column (C = 6 N D) and otherwise the median of flops / (N D) over the
rows that have one (our FLOPs model counts attention, so k is above 6 and grows with sequence
length); a row without a positive flops value gets C = k N D.

Uncertainty: a bootstrap that resamples runs with replacement within each compute budget
(so every resample keeps the IsoFLOP design); 95% percentile intervals.

Outlier rule (stated once, applied by `prepare`/`fit`): a run is dropped before fitting if
its loss is not a finite positive number or its status is not 'done'; after a first
approach-3 fit, a run whose log-loss residual exceeds max(4 x 1.4826 x MAD, 0.02) (a
robust 4-sigma, and at least 2% in loss) is an outlier, dropped, and the fit repeated
once. In approach 2 a budget whose parabola opens downwards or whose vertex falls outside
the sampled range of N is left out of the power law (no extrapolated minima). Every
dropped run or budget is listed in the result.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize, nnls

from vidscale.scaling.study.hparams import fit_hparams
from vidscale.scaling.study.stats import ci95, num

HUBER_DELTA = 1e-3
OUTLIER_SIGMAS = 4.0
OUTLIER_MIN = 0.02


# --- data ------------------------------------------------------------------------------
@dataclass
class Runs:
    """Fittable runs: parameters N, tokens D, compute C, final loss L, budget group id."""
    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    group: np.ndarray
    names: list[str]
    k: float
    """FLOPs per parameter per token: C = k N D."""
    dropped: list[dict] = field(default_factory=list)

    def take(self, idx) -> "Runs":
        idx = np.asarray(idx)
        return Runs(self.N[idx], self.D[idx], self.C[idx], self.L[idx], self.group[idx],
                    [self.names[i] for i in idx], self.k, list(self.dropped))


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results CSV as dicts. One-line ValueError for a missing file or column."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: results file not found")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0]) if rows else set()
    missing = [c for c in ("params", "tokens", "loss") if c not in cols]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; a results CSV needs params, tokens, loss "
                         f"(flops optional), found {sorted(cols)}")
    return rows


def prepare(rows: list[dict], where: str = "results") -> Runs:
    """Rows -> Runs, applying the first half of the outlier rule (bad loss, not done)."""
    keep, dropped = [], []
    for i, r in enumerate(rows):
        name = r.get("name") or f"row{i + 1}"
        status = (r.get("status") or "done").strip()
        n, d, loss = num(r, "params"), num(r, "tokens"), num(r, "loss")
        if status != "done":
            dropped.append({"name": name, "reason": f"status {status}"})
        elif not (math.isfinite(loss) and loss > 0):
            dropped.append({"name": name, "reason": f"loss {r.get('loss')!r} is not a positive number"})
        elif not (0 < n < math.inf and 0 < d < math.inf):
            raise ValueError(f"{where}: row {i + 1} ({name}): params and tokens must be finite positive numbers, "
                             f"got {r.get('params')!r}, {r.get('tokens')!r}")
        else:
            keep.append((name, n, d, loss, num(r, "flops"), num(r, "budget")))
    if len(keep) < 5:
        raise ValueError(f"{where}: {len(keep)} usable runs; a scaling-law fit needs at least 5 "
                         f"(dropped: {[d['name'] + ': ' + d['reason'] for d in dropped]})")
    names = [k[0] for k in keep]
    N, D, L, C, budget = (np.array([k[j] for k in keep], dtype=np.float64) for j in (1, 2, 3, 4, 5))
    counted = np.isfinite(C) & (C > 0)
    if counted.any():  # rows without FLOPs (a missing cell, an old final.json's 0) take the others' k
        k = float(np.median(C[counted] / (N[counted] * D[counted])))
        C = np.where(counted, C, k * N * D)
    else:
        k, C = 6.0, 6.0 * N * D
    # IsoFLOP groups: the nominal budget when given, else compute rounded to 1/10 decade
    key = budget if np.all(np.isfinite(budget) & (budget > 0)) else np.round(np.log10(C) * 10) / 10
    _, group = np.unique(key, return_inverse=True)
    return Runs(N, D, C, L, group, names, k, dropped)


# --- held-out runs ----------------------------------------------------------------------------
HOLDOUT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<|=)\s*([^<>=\s].*?)\s*")
"""`COLUMN OP VALUE`: matched, never evaluated."""
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        "<": lambda a, b: a < b, "=": lambda a, b: a == b}


def _as_float(x: str) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def holdout_mask(rows: list[dict], exprs: list[str], where: str = "results") -> list[bool]:
    """True for each row that any of `exprs` (`budget>=4e10`, `name=h64d1-C4e10`) selects.
    Numbers compare as numbers, anything else only with `=`, as text."""
    cols = set(rows[0]) if rows else set()
    tests = []
    for e in exprs:
        m = HOLDOUT.fullmatch(e)
        if not m:
            raise ValueError(f"--holdout {e!r}: expected COLUMN OP VALUE with OP one of >=, <=, >, <, = "
                             "(e.g. budget>=4e10)")
        col, op, value = m.groups()
        if col not in cols:
            raise ValueError(f"--holdout {e!r}: {where} has no column {col!r} (columns: {', '.join(sorted(cols))})")
        num = _as_float(value)
        if num is None and op != "=":
            raise ValueError(f"--holdout {e!r}: {op} compares numbers and {value!r} is not one")
        tests.append((col, op, value, num))
    out = []
    for r in rows:
        hit = False
        for col, op, value, num in tests:
            x = _as_float(r.get(col, ""))
            if num is not None and x is not None:
                hit |= _OPS[op](x, num)
            elif op == "=":
                hit |= (r.get(col, "") or "").strip() == value
        out.append(hit)
    if exprs and not any(out):
        raise ValueError(f"--holdout {' '.join(exprs)}: selects no row of {where}")
    return out


def holdout_check(law_p: dict, rows: list[dict]) -> dict:
    """Each held-out finished run's loss predicted by the law at its own N and D."""
    out = []
    for i, r in enumerate(rows):
        n, d, loss = num(r, "params"), num(r, "tokens"), num(r, "loss")
        if (r.get("status") or "done").strip() != "done" or not (math.isfinite(loss) and loss > 0 and n > 0 and d > 0):
            continue
        pred = law_p["E"] + law_p["A"] * n ** -law_p["alpha"] + law_p["B"] * d ** -law_p["beta"]
        c = num(r, "flops")
        out.append({"name": r.get("name") or f"row{i + 1}", "params": n, "tokens": d,
                    "flops": c if math.isfinite(c) and c > 0 else law_p["k"] * n * d,
                    "predicted": pred, "actual": loss, "rel_err": (pred - loss) / loss})
    mape = float(np.mean([abs(h["rel_err"]) for h in out])) if out else None
    return {"holdout": out, "holdout_mape": mape}


# --- approach 3: parametric fit ------------------------------------------------------------
def _lse(terms: np.ndarray) -> np.ndarray:
    """logsumexp over axis 0 (scipy's is ~10x slower at this size, and this runs in the bootstrap)."""
    m = terms.max(axis=0)
    return m + np.log(np.exp(terms - m).sum(axis=0))


def _predict_log(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    e, a, b, alpha, beta = theta
    return _lse(np.stack([np.full_like(logN, e), a - alpha * logN, b - beta * logD]))


def _objective(theta, logN, logD, logL, delta):
    """Huber of log residuals (divided by delta so L-BFGS sees O(1) values) and its gradient."""
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(logN, e), a - alpha * logN, b - beta * logD])
    lse = _lse(terms)
    w = np.exp(terms - lse)  # softmax weights: d lse / d (e, a, b)
    r = logL - lse
    absr = np.abs(r)
    h = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)) / delta
    g_r = -np.clip(r, -delta, delta) / delta  # d h / d lse
    grad = np.array([np.sum(g_r * w[0]), np.sum(g_r * w[1]), np.sum(g_r * w[2]),
                     np.sum(g_r * w[1] * -logN), np.sum(g_r * w[2] * -logD)])
    return float(h.sum()), grad


_EXP_GRID = np.linspace(0.05, 1.5, 30)
_BOUNDS = [(-10, 10), (-30, 60), (-30, 60), (1e-3, 3.0), (1e-3, 3.0)]


def _varpro_starts(N, D, L, top: int) -> list[np.ndarray]:
    """Best (alpha, beta) of a grid, each with its NNLS-optimal (E, A, B), as log-space starts."""
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    cands = []
    for alpha in _EXP_GRID:
        xn = N ** -alpha
        for beta in _EXP_GRID:
            X = np.stack([np.ones_like(N), xn, D ** -beta], axis=1) / L[:, None]  # relative residuals
            scale = np.linalg.norm(X, axis=0)
            coef, _ = nnls(X / scale, np.ones_like(L))
            coef = np.maximum(coef / scale, 1e-12)
            theta = np.array([math.log(coef[0]), math.log(coef[1]), math.log(coef[2]), alpha, beta])
            theta = np.clip(theta, [lo for lo, _ in _BOUNDS], [hi for _, hi in _BOUNDS])
            cands.append((_objective(theta, logN, logD, logL, HUBER_DELTA)[0], theta))
    cands.sort(key=lambda c: c[0])
    return [t for _, t in cands[:top]]


def fit_parametric(N, D, L, starts: list[np.ndarray] | None = None, top: int = 6) -> np.ndarray:
    """theta = (log E, log A, log B, alpha, beta) minimising the Huber loss on log L."""
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    starts = list(starts or []) + (_varpro_starts(N, D, L, top) if top else [])
    best, best_f = None, math.inf
    for s in starts:
        res = minimize(_objective, s, args=(logN, logD, logL, HUBER_DELTA), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
        if res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    assert best is not None
    return best


def _exp(x: float) -> float:
    """exp that saturates at inf instead of raising OverflowError (a degenerate law: callers
    and `ci95` treat non-finite values as no estimate)."""
    return math.exp(x) if x < 709.0 else math.inf


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def law(theta: np.ndarray, k: float) -> dict:
    """The named parameters of theta and the compute-optimal exponents."""
    e, la, lb, alpha, beta = (float(x) for x in theta)
    A, B = math.exp(la), math.exp(lb)
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    # with alpha + beta near 0 (A or B ~ 0: a degenerate fit) log G runs to +-1e4 and beyond
    log_g = (math.log(alpha) + la - math.log(beta) - lb) / (alpha + beta)
    return {"E": math.exp(e), "A": A, "B": B, "alpha": alpha, "beta": beta, "a": a, "b": b,
            "G": _exp(log_g), "log_G": log_g, "k": k}


def optimum(p: dict, C: float) -> tuple[float, float, float]:
    """(N_opt, D_opt, loss) at compute C under the parametric law p, computed in log space:
    a degenerate law (A or B ~ 0) puts N_opt at 0 or infinity, and the loss terms, each
    exp(log A - alpha log N), stay finite where the law does."""
    log_x = math.log(C / p["k"])
    log_n = p.get("log_G", _log(p["G"])) + p["a"] * log_x
    log_d = log_x - log_n
    terms = [_log(p["A"]) - p["alpha"] * log_n, _log(p["B"]) - p["beta"] * log_d]
    loss = p["E"] + sum(_exp(t) for t in terms if not math.isnan(t))
    return _exp(log_n), _exp(log_d), loss


# --- approach 2: IsoFLOP parabolas -----------------------------------------------------------
def isoflop_minima(runs: Runs) -> tuple[list[dict], list[dict]]:
    """Per budget: the parabola loss = c2 x^2 + c1 x + c0 in x = log N, and its vertex."""
    minima, skipped = [], []
    for g in np.unique(runs.group):
        m = runs.group == g
        C = float(np.exp(np.mean(np.log(runs.C[m]))))
        x, y = np.log(runs.N[m]), runs.L[m]
        if len(np.unique(x)) < 3:
            skipped.append({"budget": C, "reason": f"{len(np.unique(x))} model sizes (a parabola needs 3)"})
            continue
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            skipped.append({"budget": C, "reason": "the parabola opens downwards"})
            continue
        xs = -c1 / (2 * c2)
        if not x.min() <= xs <= x.max():
            skipped.append({"budget": C, "reason": "the minimum lies outside the sampled model sizes"})
            continue
        n = math.exp(xs)
        minima.append({"budget": C, "N_opt": n, "D_opt": C / (runs.k * n), "loss": float(np.polyval([c2, c1, c0], xs)),
                       "parabola": [float(c2), float(c1), float(c0)]})
    return minima, skipped


def power_laws(minima: list[dict]) -> dict | None:
    """Lines through log N*, log D* against log C. None with fewer than 2 usable budgets."""
    if len(minima) < 2:
        return None
    lc = np.log([m["budget"] for m in minima])
    a, log_cn = np.polyfit(lc, np.log([m["N_opt"] for m in minima]), 1)
    b, log_cd = np.polyfit(lc, np.log([m["D_opt"] for m in minima]), 1)
    return {"a": float(a), "b": float(b), "log_cN": float(log_cn), "log_cD": float(log_cd)}


# --- the whole fit -----------------------------------------------------------------------
def _outliers(runs: Runs, theta: np.ndarray) -> np.ndarray:
    r = np.log(runs.L) - _predict_log(theta, np.log(runs.N), np.log(runs.D))
    mad = 1.4826 * np.median(np.abs(r - np.median(r)))
    return np.abs(r) > max(OUTLIER_SIGMAS * mad, OUTLIER_MIN)


def _bootstrap_indices(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = []
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        idx.append(rng.choice(members, size=len(members), replace=True))
    return np.concatenate(idx)


def fit(rows: list[dict], budgets: list[float] = (), bootstrap: int = 200, seed: int = 0,
        where: str = "results", holdout: list[str] = ()) -> dict:
    """Approach 2 and 3 with bootstrap 95% intervals and predictions at `budgets` (FLOPs).
    `holdout` expressions (`holdout_mask`) take rows out of the fit; the result then also says
    how well the law predicts them (`holdout`, `holdout_mape`)."""
    held = []
    if holdout:  # first: held-out runs inform no law, the hyperparameter laws included
        mask = holdout_mask(rows, list(holdout), where)
        held = best_per_point([r for r, m in zip(rows, mask) if m])
        rows = [r for r, m in zip(rows, mask) if not m]
    hp = fit_hparams(rows, bootstrap=bootstrap, seed=seed)
    rows = best_per_point(rows)
    try:  # L-BFGS-B's tiny BLAS calls are ~70x slower with threaded OpenBLAS on a busy machine
        from threadpoolctl import threadpool_limits
    except ImportError:
        result = _fit(rows, budgets, bootstrap, seed, where)
    else:
        with threadpool_limits(1):
            result = _fit(rows, budgets, bootstrap, seed, where)
    if holdout:
        result.update(holdout_check(result["_law"], held))
        result["holdout_exprs"] = list(holdout)
    if any(hp.values()):
        result["hparams"] = hp
    return result


def best_per_point(rows: list[dict]) -> list[dict]:
    """With an lr or batch axis, several runs share one (N, budget) point: the law is fitted to
    the best of them (lowest loss among the finished ones)."""
    if all(len({r.get(k) for r in rows}) <= 1 for k in ("lr", "tokens_per_batch")):
        return rows
    best: dict[tuple, dict] = {}
    out = []
    for r in rows:
        key = (r.get("params"), r.get("budget") or r.get("tokens"), r.get("seed"))
        loss = num(r, "loss")
        if (r.get("status") or "done").strip() != "done" or not math.isfinite(loss):
            out.append(r)  # dropped later, and listed
        elif key not in best or loss < num(best[key], "loss"):
            best[key] = r
    return out + list(best.values())


def _fit(rows, budgets, bootstrap, seed, where) -> dict:
    runs = prepare(rows, where)
    theta = fit_parametric(runs.N, runs.D, runs.L)
    out_mask = _outliers(runs, theta)
    outliers = []
    if out_mask.any() and (~out_mask).sum() >= 5:
        outliers = [runs.names[i] for i in np.flatnonzero(out_mask)]
        runs = runs.take(np.flatnonzero(~out_mask))
        theta = fit_parametric(runs.N, runs.D, runs.L, starts=[theta])
    p = law(theta, runs.k)
    minima, skipped = isoflop_minima(runs)
    pl = power_laws(minima)

    # bootstrap: refit from the full-data optimum and the best grid starts
    rng = np.random.default_rng(seed)
    keys = ("E", "A", "B", "alpha", "beta", "a", "b")
    boot = {k: [] for k in keys}
    boot2 = {"a": [], "b": []}
    boot_pred = {c: {"N_opt": [], "D_opt": [], "loss": []} for c in budgets}
    boot_laws = []
    for _ in range(bootstrap):
        r = runs.take(_bootstrap_indices(runs.group, rng))
        pb = law(fit_parametric(r.N, r.D, r.L, starts=[theta], top=0), runs.k)
        boot_laws.append(pb)
        for k in keys:
            boot[k].append(pb[k])
        for c in budgets:
            for name, v in zip(("N_opt", "D_opt", "loss"), optimum(pb, c)):
                boot_pred[c][name].append(v)
        pl_b = power_laws(isoflop_minima(r)[0])
        if pl_b is not None:
            boot2["a"].append(pl_b["a"])
            boot2["b"].append(pl_b["b"])

    resid = np.log(runs.L) - _predict_log(theta, np.log(runs.N), np.log(runs.D))
    result = {k: p[k] for k in keys}
    result["warnings"] = _warnings(runs, theta, p, minima, skipped)
    result.update({
        "G": p["G"], "k": runs.k, "n_runs": int(len(runs.L)),
        "ci": {k: ci95(boot[k]) for k in keys},
        "approach2": ({"a": pl["a"], "b": pl["b"], "log_cN": pl["log_cN"], "log_cD": pl["log_cD"],
                       "ci": {"a": ci95(boot2["a"]), "b": ci95(boot2["b"])}} if pl else
                      {"a": None, "b": None, "ci": {"a": None, "b": None}}),
        "isoflop": minima,
        "skipped_budgets": skipped,
        "outliers": outliers,
        "dropped": runs.dropped,
        "residuals": [{"name": n, "params": float(N), "tokens": float(D), "flops": float(C), "loss": float(L),
                       "log_residual": float(rr)} for n, N, D, C, L, rr in
                      zip(runs.names, runs.N, runs.D, runs.C, runs.L, resid)],
        "huber_delta": HUBER_DELTA, "bootstrap": bootstrap,
        "outlier_rule": (f"dropped: status other than 'done' or a non-positive/non-finite loss; then runs with "
                         f"|log residual| > max({OUTLIER_SIGMAS:g} x 1.4826 x MAD, {OUTLIER_MIN:g}) "
                         f"after a first approach-3 fit"),
        "predictions": [],
        "_boot_laws": boot_laws,  # for the report's confidence band; stripped from JSON output
        "_law": p,
    })
    for c in budgets:
        n, d, loss = optimum(p, c)
        pred = {"budget": float(c), "N_opt": n, "D_opt": d, "loss": loss,
                "ci": {k: ci95(v) for k, v in boot_pred[c].items()}}
        if pl:
            n2 = math.exp(pl["log_cN"]) * c ** pl["a"]
            pred["approach2"] = {"N_opt": n2, "D_opt": math.exp(pl["log_cD"]) * c ** pl["b"]}
        result["predictions"].append(pred)
    return result


def _warnings(runs: Runs, theta: np.ndarray, p: dict, minima: list, skipped: list) -> list[str]:
    """What makes a fit untrustworthy, in words (the report shows them first)."""
    out = []
    terms = {"E": np.full_like(runs.N, p["E"]), "A": p["A"] / runs.N ** p["alpha"], "B": p["B"] / runs.D ** p["beta"]}
    for name, t in terms.items():
        if np.max(t / runs.L) < 1e-3:
            out.append(f"{name} fell to ~0 (its term is under 0.1% of every loss): the data do not constrain it")
    for i, name in ((3, "alpha"), (4, "beta")):
        lo, hi = _BOUNDS[i]
        if theta[i] <= lo * 10 or theta[i] >= hi * 0.98:
            out.append(f"{name} = {theta[i]:.3g} sits at its bound [{lo:g}, {hi:g}]")
    n_lo, n_hi = runs.N.min(), runs.N.max()
    c_mid = float(np.exp(np.mean(np.log(runs.C))))
    n_opt = optimum(p, c_mid)[0]
    if not n_lo / 10 <= n_opt <= n_hi * 10:
        out.append(f"the fitted optimum at the sweep's compute ({n_opt:.3g} parameters) lies far outside the "
                   f"sampled sizes [{n_lo:.3g}, {n_hi:.3g}]: extend the grid towards it")
    if skipped and not minima:
        out.append("no budget has an interior IsoFLOP minimum: approach 2 has no estimate; the sizes do not "
                   "bracket the optimum")
    return out


def public(result: dict) -> dict:
    """The result without private fields (what --json prints and report.md embeds)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
