"""Scaling-law fits recover a known law from noisy IsoFLOP sweeps, by both approaches.

Tolerances (stated here once): with 0.5% multiplicative noise on 5 budgets x 7 sizes,
E within 3%, alpha and beta within 0.03, a and b within 0.02 (approach 3) and 0.03
(approach 2), and the two approaches agree on a within 0.03.
"""
import csv
import json
import math

import numpy as np
import pytest

from vidscale.scaling.cli.main import main
from vidscale.scaling.study.fit import fit, optimum, public

# Chinchilla's published fit, and a second law with beta > alpha and a low E. (E and the
# exponents are only identifiable when the reducible loss over the sampled range is large
# against the noise: a law at 10% above E with 0.5% noise gives alpha +- 0.1.)
LAWS = {
    "chinchilla": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "steep": dict(E=0.45, A=2000.0, B=1e5, alpha=0.45, beta=0.55),
}


def sweep_rows(E, A, B, alpha, beta, k=6.0, noise=0.005, seed=0, budgets=(1e17, 1e18, 1e19, 1e20, 1e21),
               sizes=7, span=1.6):
    """An IsoFLOP design around each budget's true optimum, with log-normal loss noise."""
    rng = np.random.default_rng(seed)
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    rows = []
    for C in budgets:
        n_opt = G * (C / k) ** (beta / (alpha + beta))
        for f in np.exp(np.linspace(-span, span, sizes)):
            N = n_opt * f
            D = C / (k * N)
            L = (E + A / N ** alpha + B / D ** beta) * math.exp(rng.normal(0, noise))
            rows.append({"name": f"c{C:.0e}-n{N:.3g}", "params": N, "tokens": D, "flops": C, "loss": L,
                         "status": "done"})
    return rows


@pytest.mark.parametrize("name", list(LAWS))
def test_recovers_known_law_by_both_approaches(name):
    t = LAWS[name]
    r = fit(sweep_rows(**t), budgets=[1e23], bootstrap=60)
    a_true, b_true = t["beta"] / (t["alpha"] + t["beta"]), t["alpha"] / (t["alpha"] + t["beta"])
    assert r["E"] == pytest.approx(t["E"], rel=0.03)
    assert abs(r["alpha"] - t["alpha"]) < 0.03 and abs(r["beta"] - t["beta"]) < 0.03, (r["alpha"], r["beta"])
    assert abs(r["a"] - a_true) < 0.02 and abs(r["b"] - b_true) < 0.02
    a2 = r["approach2"]
    assert abs(a2["a"] - a_true) < 0.03 and abs(a2["b"] - b_true) < 0.03, a2
    assert abs(a2["a"] - r["a"]) < 0.03  # the two approaches agree
    assert len(r["isoflop"]) == 5 and not r["outliers"] and not r["warnings"]
    # the intervals are real intervals around the estimate, and cover the truth here
    for k in ("E", "alpha", "beta", "a"):
        lo, hi = r["ci"][k]
        assert lo <= r[k] <= hi and lo < hi
    assert r["ci"]["alpha"][0] - 0.02 < t["alpha"] < r["ci"]["alpha"][1] + 0.02
    # the prediction is the optimum of the true law (within the fitted law's error)
    p = r["predictions"][0]
    true = dict(t, a=a_true, b=b_true, k=6.0,
                G=(t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"])))
    n_true, d_true, l_true = optimum(true, 1e23)
    assert p["N_opt"] * p["D_opt"] * 6 == pytest.approx(1e23, rel=1e-9)
    assert abs(math.log(p["N_opt"] / n_true)) < math.log(1.6)
    assert p["loss"] == pytest.approx(l_true, rel=0.02)


def test_outlier_is_dropped_and_listed():
    rows = sweep_rows(**LAWS["chinchilla"], seed=3)
    rows[10]["loss"] *= 1.3  # a diverged run
    rows.append({"name": "crashed", "params": 1e8, "tokens": 1e9, "loss": "nan", "status": "done"})
    rows.append({"name": "failed", "params": 1e8, "tokens": 1e9, "loss": "", "status": "failed"})
    r = fit(rows, bootstrap=0)
    assert r["outliers"] == [rows[10]["name"]]
    assert {d["name"] for d in r["dropped"]} == {"crashed", "failed"}
    assert r["n_runs"] == 34
    assert abs(r["alpha"] - 0.34) < 0.03 and r["E"] == pytest.approx(1.69, rel=0.03)


def test_flops_column_sets_the_compute_constant():
    # attention makes C / (N D) larger than 6; the optimum must respect the measured constant
    rows = sweep_rows(**LAWS["chinchilla"], k=9.0, seed=5)
    r = fit(rows, budgets=[1e22], bootstrap=0)
    assert r["k"] == pytest.approx(9.0)
    p = r["predictions"][0]
    assert p["N_opt"] * p["D_opt"] * 9.0 == pytest.approx(1e22, rel=1e-9)
    assert abs(r["approach2"]["a"] - r["a"]) < 0.03
    for m in r["isoflop"]:
        assert m["N_opt"] * m["D_opt"] * 9.0 == pytest.approx(m["budget"], rel=1e-9)
    # one run without FLOPs (final.json's 0 of a run resumed at its last step, or an empty
    # cell) keeps every other run's measured FLOPs and k; it gets C = k N D
    holey = [dict(row) for row in rows]
    holey[3]["flops"], holey[10]["flops"] = 0.0, ""
    h = fit(holey, budgets=[1e22], bootstrap=0)
    assert h["k"] == pytest.approx(9.0) and h["predictions"][0]["N_opt"] == pytest.approx(p["N_opt"], rel=1e-6)
    fitted = {x["name"]: x["flops"] for x in h["residuals"]}
    assert fitted[rows[3]["name"]] == pytest.approx(9.0 * rows[3]["params"] * rows[3]["tokens"])
    assert fitted[rows[5]["name"]] == rows[5]["flops"]
    # without the flops column: C = 6 N D
    for row in rows:
        del row["flops"]
    assert fit(rows, bootstrap=0)["k"] == 6.0


def test_bad_input_is_one_line(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("params,loss\n1,2\n")
    with pytest.raises(ValueError, match="tokens") as e:
        from vidscale.scaling.study.fit import read_results
        read_results(p)
    assert "\n" not in str(e.value) and "r.csv" in str(e.value)
    with pytest.raises(ValueError, match="at least 5"):
        fit(sweep_rows(**LAWS["chinchilla"])[:3], bootstrap=0)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_fit_cli_json_and_plot(tmp_path, capsys):
    rows = sweep_rows(**LAWS["chinchilla"], seed=1)
    for r in rows:
        del r["flops"]  # optional column
    _write_csv(tmp_path / "results.csv", rows)
    rc = main(["fit", str(tmp_path / "results.csv"), "--json", "--plot", str(tmp_path / "fit.png"),
               "--budget", "1e22", "1e23", "--bootstrap", "30"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert math.isfinite(out[k]) and out["ci"][k] is not None
    assert set(out["approach2"]) >= {"a", "b"}
    assert [p["budget"] for p in out["predictions"]] == [1e22, 1e23]
    assert all({"N_opt", "D_opt", "loss"} <= set(p) for p in out["predictions"])
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_cli_error_is_one_line(tmp_path, capsys):
    rc = main(["fit", str(tmp_path / "missing.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "missing.csv" in err


def test_report_writes_plots_and_markdown(tmp_path):
    from vidscale.scaling.study.report import PLOTS, write_report
    rows = sweep_rows(**LAWS["steep"], seed=2)
    r = fit(rows, budgets=[1e22], bootstrap=20)
    md = write_report(tmp_path, r, rows, title="test sweep")
    text = md.read_text()
    for name in PLOTS:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{name}.png" in text
    assert "| alpha |" in text and "Predictions" in text and "Outliers" in text
    assert public(r).keys() == {k for k in r if not k.startswith("_")}


def test_degenerate_sweep_is_flagged():
    """Sizes that never bracket the optimum (loss falls with data only): say so, do not pretend."""
    rng = np.random.default_rng(4)
    rows = [{"params": N, "tokens": C / (6 * N), "flops": C, "loss": (0.1 + 50 / (C / (6 * N)) ** 0.35)
             * math.exp(rng.normal(0, 0.005))} for C in (1e15, 1e16, 1e17) for N in np.geomspace(1e6, 1e8, 5)]
    r = fit(rows, bootstrap=0)
    text = " ".join(r["warnings"])
    assert "A fell to ~0" in text and "outside the sampled sizes" in text


# -- held-out runs ------------------------------------------------------------------------------
def test_holdout_predicts_unseen_budget_and_never_fits_it():
    rows = sweep_rows(**LAWS["chinchilla"], seed=3)
    out = fit(rows, bootstrap=0, holdout=["flops>=1e21"])
    assert out["n_runs"] == 28 and len(out["holdout"]) == 7  # the largest budget's 7 runs are not fitted
    assert {h["name"] for h in out["holdout"]} == {r["name"] for r in rows if r["flops"] >= 1e21}
    t = LAWS["chinchilla"]
    for h in out["holdout"]:  # the prediction is the law at the run's own N and D
        truth = t["E"] + t["A"] / h["params"] ** t["alpha"] + t["B"] / h["tokens"] ** t["beta"]
        assert abs(h["predicted"] / truth - 1) < 0.01
        assert h["rel_err"] == pytest.approx((h["predicted"] - h["actual"]) / h["actual"])
    assert out["holdout_mape"] < 0.012  # 0.5% noise on the actual losses, ~0.5% extrapolation error
    # a held-out run's loss has no say in the fit: corrupt one by +20% and nothing else moves
    bad = [dict(r) for r in rows]
    victim = next(r for r in bad if r["flops"] >= 1e21)
    victim["loss"] *= 1.2
    out2 = fit(bad, bootstrap=0, holdout=["flops>=1e21"])
    assert out2["alpha"] == out["alpha"] and out2["E"] == out["E"]
    h = next(h for h in out2["holdout"] if h["name"] == victim["name"])
    assert h["rel_err"] == pytest.approx(1 / 1.2 - 1, abs=0.02)


def test_holdout_by_name_and_several_expressions(tmp_path, capsys):
    rows = sweep_rows(**LAWS["chinchilla"], seed=4)
    _write_csv(tmp_path / "results.csv", rows)
    one = rows[3]["name"]
    rc = main(["fit", str(tmp_path / "results.csv"), "--json", "--bootstrap", "0",
               "--holdout", f"name={one}", "--holdout", "flops<1e17"])  # '<1e17' matches nothing: fine
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["name"] for h in out["holdout"]] == [one] and out["n_runs"] == len(rows) - 1
    assert set(out["holdout"][0]) >= {"name", "predicted", "actual", "rel_err"}
    assert out["holdout_mape"] == pytest.approx(abs(out["holdout"][0]["rel_err"]))
    rc = main(["fit", str(tmp_path / "results.csv"), "--bootstrap", "0", "--holdout", "flops>=1e21",
               "--plot", str(tmp_path / "fit.png")])
    text = capsys.readouterr().out
    assert rc == 0 and "held out (flops>=1e21): 7 runs" in text
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("expr, says", [("budget>=1e20", "no column 'budget'"), ("flops>=big", "not one"),
                                        ("flops ~ 3", "COLUMN OP VALUE"), ("flops>1e30", "selects no row"),
                                        ("__import__('os')>1", "COLUMN OP VALUE")])
def test_bad_holdout_is_one_line(tmp_path, capsys, expr, says):
    rows = sweep_rows(**LAWS["chinchilla"], seed=4)
    _write_csv(tmp_path / "results.csv", rows)
    rc = main(["fit", str(tmp_path / "results.csv"), "--bootstrap", "0", "--holdout", expr])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and says in err, err


def test_sweep_report_checks_its_holdout(tmp_path):
    """A sweep file's `holdout` key: the report's fit leaves those runs out and tables their predictions."""
    from conftest import write_sweep
    from vidscale.scaling.study.plan import load_sweep
    from vidscale.scaling.study.report import write_sweep_report
    sweep = load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1e10]\nholdout: ['budget>=1e21']\n"))
    rows = [dict(r, budget=r["flops"]) for r in sweep_rows(**LAWS["chinchilla"], seed=5)]
    sweep.dir.mkdir(parents=True)
    report = write_sweep_report(sweep, rows, [], bootstrap=0).read_text()
    fitted = json.loads((sweep.dir / "fit.json").read_text())
    assert fitted["n_runs"] == 28 and len(fitted["holdout"]) == 7 and fitted["holdout_mape"] < 0.02
    assert "## Held-out runs" in report and f"{fitted['holdout_mape']:.2%}" in report
    assert all(h["name"] in report for h in fitted["holdout"])
    with pytest.raises(ValueError, match=r"holdout\[0\]"):
        load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1e10]\nholdout: ['budget => 1']\n", "bad.yaml"))


@pytest.mark.parametrize("la, lb", [(60.0, -30.0), (-30.0, 60.0)])
def test_degenerate_law_gives_inf_or_0_not_overflow(la, lb):
    """alpha + beta near 0 (inside the fit's bounds, as a bad bootstrap resample can give) puts
    log G at +-4.5e4: G and N_opt, D_opt saturate at inf or 0 instead of raising OverflowError,
    and the loss at the optimum is that of the law, computed exactly (mpmath) as reference."""
    import mpmath
    from vidscale.scaling.study.fit import law
    theta = np.array([0.5, la, lb, 1e-3, 1e-3])
    p = law(theta, 6.0)
    mp_log_g = (mpmath.log(1e-3) + la - mpmath.log(1e-3) - lb) / mpmath.mpf(2e-3)
    assert p["log_G"] == pytest.approx(float(mp_log_g)) and p["G"] == (math.inf if la > lb else 0.0)
    C = 1e15
    n, d, loss = optimum(p, C)
    mp_n = mpmath.exp(mp_log_g) * (mpmath.mpf(C) / 6) ** 0.5
    mp_d = mpmath.mpf(C) / 6 / mp_n
    mp_loss = mpmath.exp(0.5) + mpmath.exp(la) * mp_n ** -1e-3 + mpmath.exp(lb) * mp_d ** -1e-3
    assert (n, d) == ((math.inf, 0.0) if la > lb else (0.0, math.inf))
    assert loss == pytest.approx(float(mp_loss), rel=1e-9)


@pytest.mark.parametrize("cmd", ["sweep", "fit"])
@pytest.mark.parametrize("budget", ["0", "-1", "inf", "nan"])
def test_budget_must_be_finite_and_positive(tmp_path, capsys, cmd, budget):
    """`sweep --budget 0` trained the whole sweep to write 'No fit: math domain error';
    `fit --budget inf` ended in an OverflowError: both are refused before anything runs."""
    with pytest.raises(SystemExit) as e:
        main([cmd, str(tmp_path / "whatever"), "--budget", budget])
    assert e.value.code == 2
    assert f"--budget: expected a finite positive FLOPs number, got '{budget}'" in capsys.readouterr().err


def test_sweep_report_without_a_fit_removes_an_old_fit_json(tmp_path):
    """A report with no fit this time leaves no fit.json of an earlier one (`vidscale sweep`
    would print its held-out error as this sweep's)."""
    from conftest import write_sweep
    from vidscale.scaling.study.plan import load_sweep
    from vidscale.scaling.study.report import write_sweep_report
    sweep = load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1e10]\n"))
    rows = [dict(r, budget=r["flops"]) for r in sweep_rows(**LAWS["chinchilla"], seed=5)]
    sweep.dir.mkdir(parents=True)
    write_sweep_report(sweep, rows, [], bootstrap=0)
    assert (sweep.dir / "fit.json").is_file()
    for r in rows[3:]:
        r["status"] = "failed"
    report = write_sweep_report(sweep, rows, [], bootstrap=0).read_text()
    assert "No fit: 3 finished runs" in report and not (sweep.dir / "fit.json").exists()
