"""`mfu` divides by a GEMM peak that is measured again during the run (the machine's load
moves it), and each metrics record says which peak it used."""
import json

import torch

from vidscale.scaling.train import loop
from vidscale.scaling.train.flops import measure_peak_flops

from conftest import short_run


def test_the_peak_is_remeasured_and_logged_with_the_mfu_it_divides(tmp_path, monkeypatch):
    peaks = iter([1e9, 2e9, 4e9, 8e9, 16e9, 32e9, 64e9])
    monkeypatch.setattr(loop, "measure_peak_flops", lambda *a, **k: next(peaks))
    monkeypatch.setattr(loop, "PEAK_EVERY_S", 0.0)  # at every logging step
    run = tmp_path / "run"
    loop.train(short_run(run, "train.steps=4", "logging.every=1"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["peak_flops"] for r in recs] == [2e9, 4e9, 8e9, 16e9]  # 1e9 at the start, then one per record
    for r in recs:
        assert r["mfu"] > 0
    # the same work over a peak twice as large reads half the MFU, to the step-time noise
    ratios = [recs[i]["mfu"] * recs[i]["peak_flops"] * recs[i]["tokens_per_s"] ** -1 for i in range(4)]
    assert max(ratios) / min(ratios) < 1.5


def test_measuring_the_peak_leaves_the_global_rng_as_it_was():
    """Rank 0 measures at the start and every PEAK_EVERY_S of wall clock: the global RNG state
    (saved in checkpoints) must not depend on when it did."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert measure_peak_flops("cpu", n=64, seconds=0.01) > 0
    assert torch.equal(torch.get_rng_state(), before)
