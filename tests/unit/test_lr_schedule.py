"""The learning-rate schedules: warmup + cosine, and warmup-stable-decay (wsd) whose lr up to
its cooldown does not depend on the run's length (what lets runs share a trunk)."""
import math
from types import SimpleNamespace

import pytest
import torch

from vidscale.scaling.config import load_config
from vidscale.scaling.train.engine import decay_start, make_scheduler


def lrs(total, **optim):
    o = SimpleNamespace(**{"warmup": 4, "min_lr_ratio": 0.1, "schedule": "wsd", "decay_fraction": 0.25,
                           "decay_shape": "linear", **optim})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = make_scheduler(opt, o, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def test_wsd_warms_up_holds_then_decays_over_its_last_fraction():
    lr = lrs(40)
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert decay_start(4, 40, 0.25) == 30
    assert lr[4:31] == [1.0] * 27  # stable until the cooldown's first step
    assert lr[30:] == pytest.approx([1 - 0.9 * i / 10 for i in range(10)])
    assert lr[-1] > 0.1 and min(lr) == lr[-1]


def test_wsd_runs_of_different_lengths_share_their_trunk():
    short, long = lrs(40), lrs(100)
    start = decay_start(4, 40, 0.25)
    assert short[:start] == long[:start]  # a 40-step run is a branch of the 100-step trunk at step 30
    assert short[start:] != long[start:40]


def test_one_minus_sqrt_cooldown_and_cosine():
    lr = lrs(40, decay_shape="1-sqrt")
    assert lr[30:] == pytest.approx([1 - 0.9 * math.sqrt(i / 10) for i in range(10)])
    cos = lrs(40, schedule="cosine")
    assert cos[4] == pytest.approx(1.0) and cos[22] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos[5] < 1.0  # cosine decays right after warmup


@pytest.mark.parametrize("key, value, says", [("optim.schedule", "linear", "cosine or wsd"),
                                               ("optim.decay_shape", "sqrt", "linear or 1-sqrt"),
                                               ("optim.decay_fraction", "0", "(0, 1]")])
def test_bad_schedule_keys_are_one_line(key, value, says):
    with pytest.raises(ValueError, match=r".*") as e:
        load_config("recipes/debug.yaml", [f"{key}={value}"])
    msg = str(e.value)
    assert key in msg and says in msg and "\n" not in msg
