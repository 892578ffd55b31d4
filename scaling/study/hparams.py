"""Hyperparameter laws: how the optimal learning rate and batch size move with model size N
and compute C, from a sweep with an `lr` (and `tokens_per_batch`) axis.

Per cell (one budget, one model size, one batch size) the loss is a parabola in log lr, as an
IsoFLOP profile is in log N; its vertex is the cell's optimal lr (left out, and listed, when
the parabola opens downwards or its vertex lies outside the sampled lrs: no extrapolated
optima). The batch law does the same in log B over each (budget, size)'s batch sizes, each
taken at its best lr. The optima then fit a power law by least squares in log space,
    lr*(N, C) = c N^p C^q        (only the variables that vary are fitted; the other
                                  exponent is reported as null)
with 95% intervals from a bootstrap that resamples runs within each cell.
"""
from __future__ import annotations

import math

import numpy as np

from vidscale.scaling.study.stats import ci95, num

MIN_POINTS = 3
"""Distinct values of the swept axis a parabola needs."""


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([num(r, key) for r in rows], dtype=np.float64)


def _group_key(rows: list[dict]) -> np.ndarray:
    """The IsoFLOP group of each row: the nominal budget, else flops (or 6ND) to 1/10 decade."""
    budget = _col(rows, "budget")
    if np.all(np.isfinite(budget) & (budget > 0)):
        return budget
    c = _col(rows, "flops")
    if not np.all(np.isfinite(c) & (c > 0)):
        c = 6 * _col(rows, "params") * _col(rows, "tokens")
    return 10 ** (np.round(np.log10(c) * 10) / 10)


def vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | str:
    """(x*, y*) of the least-squares parabola y(x), or why there is none."""
    if len(np.unique(x)) < MIN_POINTS:
        return f"{len(np.unique(x))} distinct values (a parabola needs {MIN_POINTS})"
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return "the parabola opens downwards"
    xs = -c1 / (2 * c2)
    if not x.min() <= xs <= x.max():
        return "the minimum lies outside the sampled values"
    return float(xs), float(np.polyval([c2, c1, c0], xs))


def optima(rows: list[dict], axis: str) -> tuple[list[dict], list[dict]]:
    """Per cell, the optimal value of `axis` ('lr' or 'tokens_per_batch') and its loss. For the
    batch axis each batch size is first reduced to its best lr (its lr parabola's vertex when
    there is one, else its lowest loss)."""
    ok = [r for r in rows if (r.get("status") or "done").strip() == "done"]
    loss, n, g = _col(ok, "loss"), _col(ok, "params"), _group_key(ok)
    val, lr = _col(ok, axis), _col(ok, "lr")
    good = np.isfinite(loss) & (loss > 0) & np.isfinite(val) & (val > 0) & np.isfinite(n)
    other = "tokens_per_batch" if axis == "lr" else "lr"
    oth = _col(ok, other)
    points, skipped = [], []
    if axis == "lr":
        cells: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(good):
            cells.setdefault((g[i], n[i], oth[i] if np.isfinite(oth[i]) else 0.0), []).append(i)
        for (c, size, b), idx in sorted(cells.items()):
            v = vertex(np.log(val[idx]), loss[idx])
            if isinstance(v, str):
                skipped.append({"budget": float(c), "params": float(size), "reason": v})
            else:
                points.append({"budget": float(c), "params": float(size), "tokens_per_batch": float(b),
                               "opt": math.exp(v[0]), "loss": v[1]})
        return points, skipped
    # batch: best loss of each (budget, size, batch) over its lrs, then a parabola in log B
    best: dict[tuple, list[int]] = {}
    for i in np.flatnonzero(good):
        best.setdefault((g[i], n[i], val[i]), []).append(i)
    cells2: dict[tuple, list[tuple[float, float]]] = {}
    for (c, size, b), idx in best.items():
        v = vertex(np.log(lr[idx]), loss[idx]) if np.all(np.isfinite(lr[idx])) else "no lr"
        cells2.setdefault((c, size), []).append((b, v[1] if not isinstance(v, str) else float(loss[idx].min())))
    for (c, size), pts in sorted(cells2.items()):
        b = np.array([p[0] for p in pts])
        v = vertex(np.log(b), np.array([p[1] for p in pts]))
        if isinstance(v, str):
            skipped.append({"budget": float(c), "params": float(size), "reason": v})
        else:
            points.append({"budget": float(c), "params": float(size), "opt": math.exp(v[0]), "loss": v[1]})
    return points, skipped


def power_law(points: list[dict]) -> dict | None:
    """log opt = log c + p log N + q log C over the variables that vary; None when < 2 points."""
    if len(points) < 2:
        return None
    y = np.log([p["opt"] for p in points])
    cols, names = [np.ones(len(points))], ["log_c"]
    for key, name in (("params", "p_N"), ("budget", "q_C")):
        x = np.log([p[key] for p in points])
        if np.ptp(x) > 1e-9:
            cols.append(x)
            names.append(name)
    X = np.stack(cols, axis=1)
    if len(points) < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    out = {"log_c": None, "p_N": None, "q_C": None}
    out.update({k: float(v) for k, v in zip(names, coef)})
    out["c"] = math.exp(out["log_c"])
    return out


def predict(law: dict, params: float, budget: float) -> float:
    """The law's optimum at (N, C)."""
    v = law["log_c"]
    if law["p_N"] is not None:
        v += law["p_N"] * math.log(params)
    if law["q_C"] is not None:
        v += law["q_C"] * math.log(budget)
    return math.exp(v)


def fit_hparams(rows: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    """{'lr': law or None, 'batch': law or None}; a law has c, p_N, q_C, ci, points, skipped.
    An axis with fewer than MIN_POINTS values anywhere gives None."""
    out = {}
    rng = np.random.default_rng(seed)
    for name, axis in (("lr", "lr"), ("batch", "tokens_per_batch")):
        vals = {r.get(axis) for r in rows if r.get(axis) not in (None, "")}
        if len(vals) < MIN_POINTS:
            out[name] = None
            continue
        points, skipped = optima(rows, axis)
        law = power_law(points)
        if law is None:
            out[name] = None if not points else {"points": points, "skipped": skipped, "c": None,
                                                 "p_N": None, "q_C": None, "ci": {}}
            continue
        boot = {"p_N": [], "q_C": [], "c": []}
        cells: dict[tuple, list[dict]] = {}
        for r, k in zip(rows, _group_key(rows)):
            cells.setdefault((k, r.get("params")), []).append(r)
        for _ in range(bootstrap):
            sample = [c[i] for c in cells.values() for i in rng.integers(0, len(c), len(c))]
            b = power_law(optima(sample, axis)[0])
            if b is not None:
                for k in boot:
                    boot[k].append(b[k])
        law.update(points=points, skipped=skipped, ci={k: ci95(v) for k, v in boot.items()})
        out[name] = law
    return out
