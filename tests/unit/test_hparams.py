"""Hyperparameter laws recover known optimal-lr and optimal-batch power laws from a synthetic
sweep with lr and batch axes (loss = a Chinchilla law + quadratic penalties in log lr and
log batch around known optima, 0.2% noise). Tolerances: exponents within 0.03, the
coefficient within 10%, and each 95% interval holds the truth."""
import json
import math

import numpy as np
import pytest

from vidscale.scaling.cli.main import main
from vidscale.scaling.study.fit import fit
from vidscale.scaling.study.hparams import fit_hparams, predict

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
LR = dict(c=2.0, p_N=-0.35, q_C=0.04)      # lr*(N, C) = c N^p C^q
BATCH = dict(c=0.5, p_N=0.0, q_C=0.25)     # B*(C) = c C^0.25 (no N dependence)


def truth(law, n, c):
    return law["c"] * n ** law["p_N"] * c ** law["q_C"]


def rows(seed=0, noise=0.002):
    rng = np.random.default_rng(seed)
    out = []
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    for C in (1e17, 1e18, 1e19, 1e20):
        n_opt = G * (C / 6) ** (BETA / (ALPHA + BETA))
        for f in np.exp(np.linspace(-1, 1, 4)):
            N = n_opt * f
            D = C / (6 * N)
            base = E + A / N ** ALPHA + B / D ** BETA
            lr0, b0 = truth(LR, N, C), truth(BATCH, N, C)
            for bf in (-0.9, 0.1, 1.0):     # batch sizes around the optimum (not centred)
                for lf in (-1.2, -0.5, 0.2, 0.8, 1.4):
                    lr, b = lr0 * math.exp(lf), round(b0 * math.exp(bf))
                    loss = (base + 0.05 * math.log(lr / lr0) ** 2 + 0.03 * math.log(b / b0) ** 2) * \
                        math.exp(rng.normal(0, noise))
                    out.append({"name": f"C{C:.0e}-N{N:.3g}-lr{lr:.3g}-b{b}", "params": N, "tokens": D, "flops": C,
                                "budget": C, "loss": loss, "lr": lr, "tokens_per_batch": b, "status": "done"})
    return out


def test_recovers_optimal_lr_and_batch_laws():
    hp = fit_hparams(rows(), bootstrap=60)
    lr, batch = hp["lr"], hp["batch"]
    assert lr["p_N"] == pytest.approx(LR["p_N"], abs=0.03) and lr["q_C"] == pytest.approx(LR["q_C"], abs=0.03)
    assert batch["q_C"] == pytest.approx(BATCH["q_C"], abs=0.03) and abs(batch["p_N"]) < 0.03
    for n, c in ((1e8, 1e18), (3e9, 1e20)):
        assert predict(lr, n, c) == pytest.approx(truth(LR, n, c), rel=0.1)
        assert predict(batch, n, c) == pytest.approx(truth(BATCH, n, c), rel=0.1)
    for law, ref in ((lr, LR), (batch, BATCH)):
        for k in ("p_N", "q_C"):
            lo, hi = law["ci"][k]
            assert lo <= ref[k] <= hi, (k, law["ci"][k], ref[k])
    assert len(lr["points"]) == 4 * 4 * 3 and lr["skipped"] == []


def test_a_cell_whose_optimum_is_not_bracketed_is_left_out():
    rs = [r for r in rows() if not (r["budget"] == 1e17 and r["lr"] > truth(LR, r["params"], 1e17) * 0.9)]
    hp = fit_hparams(rs, bootstrap=0)
    assert {s["budget"] for s in hp["lr"]["skipped"]} == {1e17}  # only lrs below the optimum there
    assert all("distinct values" in s["reason"] or "outside" in s["reason"] for s in hp["lr"]["skipped"])
    assert hp["lr"]["q_C"] == pytest.approx(LR["q_C"], abs=0.03)


def test_fit_uses_the_best_lr_per_point_and_reports_hparams(tmp_path, capsys):
    import csv
    rs = rows(seed=1)
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rs[0]))
        w.writeheader()
        w.writerows(rs)
    assert main(["fit", str(tmp_path / "r.csv"), "--json", "--bootstrap", "20", "--plot", str(tmp_path / "f.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_runs"] == 16  # 4 budgets x 4 sizes: the best of 15 lr x batch runs each
    assert out["alpha"] == pytest.approx(ALPHA, abs=0.1) and out["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.05)
    assert set(out["hparams"]) == {"lr", "batch"} and out["hparams"]["lr"]["p_N"] == pytest.approx(LR["p_N"], abs=0.03)
    assert main(["fit", str(tmp_path / "r.csv"), "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    assert "lr_opt" in text and "batch_opt" in text


def test_no_axis_no_hparams():
    from test_fit import LAWS, sweep_rows
    assert "hparams" not in fit(sweep_rows(**LAWS["chinchilla"]), bootstrap=0)


def test_held_out_runs_stay_out_of_the_hyperparameter_laws():
    """--holdout keeps runs out of every law: the lr and batch laws (which --write-recipe uses)
    are those of the other runs alone."""
    data = rows()
    r = fit(data, bootstrap=0, holdout=["budget>=1e20"])
    kept = fit_hparams([x for x in data if x["budget"] < 1e20], bootstrap=0)
    assert len(r["hparams"]["lr"]["points"]) == 3 * 4 * 3
    for k in ("lr", "batch"):
        assert {q: r["hparams"][k][q] for q in ("c", "p_N", "q_C")} == {q: kept[k][q] for q in ("c", "p_N", "q_C")}
    assert len(r["holdout"]) == 4  # the held-out budget's sizes, each at its best lr and batch
