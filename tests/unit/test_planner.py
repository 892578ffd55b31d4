"""`vidscale plan`: every shipped recipe fits the hardware it states; the activation bytes the
planner traces on the meta device equal the bytes a real forward saves on the CPU; ZeRO's shares
scale with the world; a recipe that does not fit gets the one change that fits, written out."""
import json

import pytest
import torch

from vidscale.models import attention
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.data.synthetic import synthetic_video
from vidscale.scaling.cli.main import main
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.train.planner import memory, plan, saved_bytes

from conftest import DEBUG, ROOT

DIT_RECIPES = sorted((ROOT / "recipes").glob("dit-*.yaml"))


@pytest.mark.parametrize("recipe", DIT_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_fits_the_hardware_it_was_planned_for(recipe):
    cfg = load_config(recipe)
    assert cfg.plan.gpus >= 1 and cfg.plan.gpu_memory_gb > 0, f"{recipe.name}: no plan.gpus / plan.gpu_memory_gb"
    p = plan(cfg, cfg.plan.gpus, cfg.plan.gpu_memory_gb)
    assert p["fits"], f"{recipe.name}: {p['total_gb']:.1f} GB per rank > {cfg.plan.gpu_memory_gb} GB"
    assert p["time"]["step_s"] > 0 and p["time"]["days"] > 0


def _real_saved_bytes(cfg, tokens: int) -> int:
    """What autograd keeps after one real CPU forward (each storage once, no parameter)."""
    torch.manual_seed(0)
    model = VideoDiT(model_config(cfg.model))
    model.gather_modulation = True  # the path the planner traces (the GPU's)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, keep = {}, []

    def pack_hook(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
            keep.append(t)
        return t

    lat = torch.randn(cfg.model.in_channels, 1, 2 * tokens // 8, 2 * 8)  # one video of `tokens` patches
    text = torch.randn(cfg.data.text_tokens[1], cfg.model.text_dim)
    x, meta = pack([lat], [text], tuple(cfg.model.patch))
    assert x.shape[0] == tokens
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        model(x, torch.tensor([500.0]), meta)
    return sum(seen.values())


def test_traced_activation_bytes_equal_a_real_forwards_saved_bytes(monkeypatch):
    # the GPU's QK-norm (torch's rms_norm; the CPU's own keeps less for its backward)
    monkeypatch.setattr(attention, "rms_norm", lambda x, w, eps: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps))
    cfg = load_config(DEBUG)
    tokens = 64
    want = _real_saved_bytes(cfg, tokens)
    got = saved_bytes(cfg, tokens, torch.float32)
    assert abs(got - want) / want < 0.05, (got, want)


def test_zero3_shares_scale_with_the_world_and_checkpointing_saves_activations():
    cfg = load_config(ROOT / "recipes/dit-1B.yaml")
    m8, m16 = memory(cfg, 8), memory(cfg, 16)
    for k in ("parameters", "master_weights", "optimizer_states", "gradients", "ema"):
        assert m16[k] == pytest.approx(m8[k] / 2, rel=1e-6), k
    no_ac = load_config(ROOT / "recipes/dit-1B.yaml", ["model.activation_checkpointing=false"])
    assert memory(no_ac, 8)["activations"] > 3 * m8["activations"]


def test_a_recipe_that_does_not_fit_gets_the_change_that_fits(tmp_path, capsys):
    out = tmp_path / "fixed.yaml"
    rc = main(["plan", str(ROOT / "recipes/dit-30B.yaml"), "--gpus", "8", "--gpu-memory", "80", "--json",
               "--write-recipe", str(out)])
    p = json.loads(capsys.readouterr().out)
    assert rc == 3 and not p["fits"] and p["fix"]["written"] == str(out)
    fixed = load_config(out)
    assert (fixed.plan.gpus, fixed.plan.gpu_memory_gb) == (8, 80.0)
    again = plan(fixed, 8, 80)
    assert again["fits"] and again["total_gb"] == pytest.approx(p["fix"]["total_gb"])
    assert main(["plan", str(out)]) == 0  # planned on the hardware it now names
    assert main(["plan", str(DEBUG)]) == 2  # no hardware named: a one-line error
    # a GPU kernel is planned on a machine without one
    assert main(["plan", str(ROOT / "recipes/dit-1B.yaml"), "--set", "model.attn_backend=varlen"]) == 0


def test_write_recipe_never_overwrites_and_says_when_nothing_is_written(tmp_path, capsys):
    """As `fit --write-recipe`: an existing file (the input recipe, say) is refused in one line
    and left as it was; a recipe that fits as it is gets no file, and is told so."""
    out = tmp_path / "fixed.yaml"
    out.write_text("# mine\n")
    rc = main(["plan", str(ROOT / "recipes/dit-30B.yaml"), "--gpus", "8", "--gpu-memory", "80",
               "--write-recipe", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists; --write-recipe never overwrites" in err and len(err.splitlines()) == 1
    assert out.read_text() == "# mine\n"
    new = tmp_path / "new.yaml"
    assert main(["plan", str(ROOT / "recipes/dit-1B.yaml"), "--gpus", "8", "--gpu-memory", "80",
                 "--write-recipe", str(new)]) == 0
    assert f"nothing written to {new}: the recipe fits as it is" in capsys.readouterr().out and not new.exists()


def test_bench_plan_calibrates_the_mfu_of_one_rank_whatever_the_data_parallel_size():
    """`vidscale bench plan --calibrate` on measured numbers (nothing timed): a rank of a dp=2
    case does the work of the lone rank of dp=1 (its own batch), a rank of sp=2 half of it."""
    from vidscale.scaling.bench.plan import COMMON, calibrated_mfu
    from vidscale.scaling.config import set_values
    from vidscale.scaling.train.flops import forward_flops
    from vidscale.scaling.train.planner import step_time

    peak, step_s = 2.0e10, 3.0  # FLOP/s of one rank, seconds of its measured step
    one = load_config(None, [*COMMON, "model.size=debug", "parallel.zero_stage=0"])
    dp2 = load_config(None, [*COMMON, "model.size=debug", "parallel.zero_stage=3"])
    sp2 = load_config(None, [*COMMON, "model.size=debug", "parallel.zero_stage=3", "parallel.ulysses=2"])
    rank_flops = 3 * forward_flops(model_config(one.model), [one.train.tokens_per_batch], [one.data.text_tokens[1]], 1)
    assert calibrated_mfu(one, 1, step_s, peak) == pytest.approx(rank_flops / (step_s * peak), rel=1e-12)
    assert calibrated_mfu(dp2, 2, step_s, peak) == pytest.approx(rank_flops / (step_s * peak), rel=1e-12)
    assert calibrated_mfu(sp2, 2, step_s, peak) == pytest.approx(rank_flops / 2 / (step_s * peak), rel=1e-12)
    for cfg, world in ((one, 1), (dp2, 2), (sp2, 2), (dp2, 4)):  # the planner at that MFU gives back step_s
        mfu = calibrated_mfu(cfg, world, step_s, peak)
        cal = set_values(cfg, {"plan.mfu": mfu})
        assert step_time(cal, world, peak / 1e12, device="cpu")["compute_s"] == pytest.approx(step_s, rel=1e-12)
