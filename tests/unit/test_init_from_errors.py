"""`train.init_from`: the one-line errors of the pre-flight check (names, shapes, sources), the
recipe checks, and the partition a ZeRO-3 rank reads from a safetensors file."""
import re

import pytest
import torch

from vidscale.models.dit import VideoDiT
from vidscale.scaling.checkpoint.weights import save_weights
from vidscale.scaling.config import RecipeError, model_config
from vidscale.scaling.parallel.parallelize import build_model
from vidscale.scaling.train import init_from

from conftest import debug_config  # noqa: E402


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    """A weights file of the debug model, as `vidscale export` writes one (seed 1)."""
    cfg = debug_config()
    model = build_model(lambda: VideoDiT(model_config(cfg.model)), torch.device("cpu"), 1)
    path = tmp_path_factory.mktemp("weights") / "a.safetensors"
    save_weights(model.state_dict(), path, cfg, extra={"step": 7})
    return path, model.state_dict()


def _check(tmp_path, *overrides):
    cfg = debug_config(*overrides)
    return init_from.check(cfg, tmp_path / "run")


def test_a_matching_file_plans_every_parameter(tmp_path, export_file):
    path, state = export_file
    plan = _check(tmp_path, f"train.init_from={path}")
    assert sorted(plan.load) == sorted(state) and not (plan.resized or plan.missing or plan.unexpected)


def test_resized_parameters_are_named_with_both_shapes(tmp_path, export_file):
    path, state = export_file
    with pytest.raises(RecipeError) as e:
        _check(tmp_path, f"train.init_from={path}", "model.in_channels=8", "model.text_dim=256")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.init_from={path}: ")
    hidden = state["x_embed.weight"].shape[0]
    # patch [1, 2, 2]: 4 -> 8 channels doubles the patch width of the embedding and the output layer
    assert f"x_embed.weight (file [{hidden}, 16], model [{hidden}, 32])" in msg, msg
    assert "final.linear.weight (file [16," in msg and "final.linear.bias (file [16], model [32])" in msg, msg
    assert re.search(r"y_embed\.\S+ \(file \[\d+, 384\], model \[\d+, 256\]\)", msg), msg
    assert "train.init_allow_resize=true" in msg


def test_resize_allowed_lists_only_the_differing_parameters(tmp_path, export_file):
    path, state = export_file
    plan = _check(tmp_path, f"train.init_from={path}", "model.in_channels=8", "train.init_allow_resize=true")
    assert sorted(n for n, _, _ in plan.resized) == ["final.linear.bias", "final.linear.weight", "x_embed.weight"]
    assert len(plan.load) == len(state) - 3 and not plan.missing and not plan.unexpected


def test_missing_and_unexpected_names_are_reported(tmp_path, export_file):
    path, state = export_file
    with pytest.raises(RecipeError) as e:  # one block more than the file has: its parameters are missing
        _check(tmp_path, f"train.init_from={path}", f"model.depth={_depth(state) + 1}")
    msg = str(e.value)
    assert f"of the model are not in it: blocks.{_depth(state)}." in msg and "\n" not in msg, msg
    with pytest.raises(RecipeError) as e:  # one block fewer: the file's last block is unexpected
        _check(tmp_path, f"train.init_from={path}", f"model.depth={_depth(state) - 1}")
    assert f"are not parameters of the model: blocks.{_depth(state) - 1}." in str(e.value), str(e.value)


def _depth(state) -> int:
    return 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))


def test_foreign_names_are_not_this_architecture(tmp_path):
    from safetensors.torch import save_file
    f = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(RecipeError, match=r"none of its 1 tensors is a parameter of this model \(it holds "
                                          r"encoder.weight; the model has x_embed.weight"):
        _check(tmp_path, f"train.init_from={f}")


def test_bad_sources_are_one_line_errors(tmp_path, export_file):
    path, _ = export_file
    with pytest.raises(RecipeError, match="no such file or directory"):
        _check(tmp_path, f"train.init_from={tmp_path / 'nope.safetensors'}")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        _check(tmp_path, f"train.init_from={junk}")
    with pytest.raises(RecipeError, match="this file holds live weights"):
        _check(tmp_path, f"train.init_from={path}", "train.init_from_ema=true")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no checkpoint there"):
        _check(tmp_path, f"train.init_from={tmp_path / 'empty'}")


def test_a_run_cannot_start_from_its_own_directory(tmp_path, export_file):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for spec in (run, run / "checkpoints"):
        with pytest.raises(RecipeError, match="that is this run's own directory .* `vidscale resume"):
            _check(tmp_path, f"train.init_from={spec}")


def test_recipe_checks():
    with pytest.raises(RecipeError, match="key 'train.init_from_ema' = True: expected train.init_from set"):
        debug_config("train.init_from_ema=true")
    with pytest.raises(RecipeError, match="key 'train.init_allow_resize' = True: expected train.init_from set"):
        debug_config("train.init_allow_resize=true")
    with pytest.raises(RecipeError, match="key 'train.init_from' = 'a.safetensors': expected '' with "
                                          "checkpoint.branch_from"):
        debug_config("train.init_from=a.safetensors", "checkpoint.branch_from=b/step_00000002")


def test_resume_does_not_load_init_from(tmp_path):
    """A run that restores its own checkpoint never reads its (possibly deleted) source again."""
    cfg = debug_config("train.init_from=gone.safetensors", "checkpoint.resume=auto")
    assert init_from.applies(cfg, tmp_path)  # no checkpoint yet: auto starts fresh, from the weights
    (tmp_path / "checkpoints/step_00000002").mkdir(parents=True)
    assert not init_from.applies(cfg, tmp_path)
    assert init_from.check(cfg, tmp_path) is None


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_zero3_partitions_read_from_the_file_tile_the_tensor(export_file, world, tmp_path):
    """Each rank's flat range (read as the rows covering it) joined over the ranks is the tensor,
    zero padded to world * partition size, as ZeRO-3 lays a parameter out."""
    path, state = export_file
    src = init_from.open_source(str(path), False, tmp_path / "run")
    for name in ("x_embed.weight", "final.linear.bias", "blocks.0.attn.qkv.weight"):
        if name not in state:
            continue
        flat = state[name].reshape(-1)
        ps = -(-flat.numel() // world)
        parts = [src.flat_range(name, r * ps, (r + 1) * ps) for r in range(world)]
        assert all(p.numel() == ps for p in parts)
        joined = torch.cat(parts)
        assert torch.equal(joined[:flat.numel()], flat) and not joined[flat.numel():].any(), name
