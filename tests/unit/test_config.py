"""Recipes: every shipped recipe loads; mistakes are one-line errors naming file and key."""
import pytest
import torch

from vidscale.data.args import LoaderArgs, PrepareArgs, SyntheticArgs
from vidscale.models.attention import KERNELS
from vidscale.scaling.config import (CHECKSUMS, LAUNCHERS, PLACEMENTS, RecipeError, check_elastic, check_layout,
                                     load_config, save_config)
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.train.zero import deepspeed_config

from conftest import ROOT  # noqa: E402
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "debug.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(path):
    if "sweeps" in path.parts or path.name.startswith("sweep"):
        from vidscale.scaling.study.plan import load_sweep  # sweep files have their own schema
        load_sweep(path)
    else:
        cfg = load_config(path)
        assert cfg.train.steps > 0


def test_contract_keys_exist():
    cfg = load_config(ROOT / "recipes/debug.yaml", ["model.size=debug", "train.steps=3", "train.seed=1",
                                                     "train.tokens_per_batch=512", "checkpoint.every=2",
                                                     "parallel.ulysses=1", "parallel.ring=1"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.tokens_per_batch, cfg.checkpoint.every) == (3, 1, 512, 2)


def _err(tmp_path, text, overrides=()):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_config(p, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_and_key(tmp_path):
    msg = _err(tmp_path, "train:\n  stpes: 3\n")
    assert "bad.yaml" in msg and "train.stpes" in msg and "train.steps" in msg


def test_wrong_type_names_key(tmp_path):
    msg = _err(tmp_path, "train:\n  steps: many\n")
    assert "bad.yaml" in msg and "train.steps" in msg


def test_bad_value_says_what_is_expected(tmp_path):
    msg = _err(tmp_path, "model:\n  size: huge\n")
    assert "bad.yaml" in msg and "model.size" in msg and "debug" in msg
    msg = _err(tmp_path, "objective:\n  name: score\n")
    assert "objective.name" in msg and "ddpm" in msg


def test_bad_override(tmp_path):
    msg = _err(tmp_path, "name: x\n", ["train.steps=-4"])
    assert "train.steps" in msg and "positive" in msg
    msg = _err(tmp_path, "name: x\n", ["nokey"])
    assert "key=value" in msg


def test_an_empty_override_empties_a_string_key_and_nothing_else(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cluster:\n  address: 127.0.0.1:6379\n")
    assert load_config(recipe).cluster.address == "127.0.0.1:6379"
    for empty in ("cluster.address=", "cluster.address=''", 'cluster.address=""'):
        assert load_config(recipe, [empty]).cluster.address == ""
    msg = _err(tmp_path, "name: x\n", ["train.steps="])  # not a string: still refused, naming the key
    assert "train.steps" in msg and "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    msg = _err(tmp_path, "train: [unclosed\n")
    assert "bad.yaml" in msg and "YAML" in msg


def test_base_recipe_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {ROOT / 'recipes/debug.yaml'}\ntrain:\n  steps: 7\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 7 and cfg.model.size == "debug"


def test_data_section_keys_stay_flat(tmp_path):
    """`data` is one flat section however its parts are declared: YAML and --set keys, and
    the saved config.yaml, load back into the same structured config."""
    (tmp_path / "r.yaml").write_text("data:\n  lookahead: 8\n  clip_frames: 9\n")
    cfg = load_config(tmp_path / "r.yaml", ["data.source=synthetic", "data.synthetic_videos=12", "data.encoder=pixel:8"])
    assert all(isinstance(cfg.data, part) for part in (LoaderArgs, SyntheticArgs, PrepareArgs))
    assert (cfg.data.lookahead, cfg.data.clip_frames, cfg.data.synthetic_videos, cfg.data.encoder) == (8, 9, 12, "pixel:8")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    msg = _err(tmp_path, "data:\n  lookahed: 8\n")
    assert "data.lookahed" in msg and "data.lookahead" in msg


def test_allowed_values_are_the_tables_of_the_code_that_acts_on_them(tmp_path):
    for text, key, table in [("model:\n  attn_backend: flash\n", "model.attn_backend", KERNELS),
                             ("checkpoint:\n  checksum: md5\n", "checkpoint.checksum", CHECKSUMS),
                             ("cluster:\n  launcher: k8s\n", "cluster.launcher", LAUNCHERS),
                             ("cluster:\n  placement: ANY\n", "cluster.placement", PLACEMENTS)]:
        msg = _err(tmp_path, text)
        assert key in msg and all(name in msg for name in table), msg


def test_layout_is_checked_when_the_recipe_loads(tmp_path):
    msg = _err(tmp_path, "name: x\n", ["cluster.nproc=3", "parallel.ulysses=2"])
    assert "parallel.ulysses=2" in msg and "does not divide the world size 3" in msg
    msg = _err(tmp_path, "name: x\n", ["parallel.ulysses=4", "model.heads=6"])  # a one-process recipe: sp 4
    assert "does not divide the model's 6" in msg
    msg = _err(tmp_path, "name: x\n", ["cluster.nproc=2", "parallel.zero_stage=0"])
    assert "parallel.zero_stage" in msg
    cfg = load_config(ROOT / "recipes/debug.yaml", ["parallel.ulysses=2"])  # completed by --nproc 2 or 4 ...
    check_layout(cfg, 4, "--nproc 4")
    with pytest.raises(RecipeError, match=r"^--nproc 3: .*does not divide the world size 3"):
        check_layout(cfg, 3, "--nproc 3")  # ... not by 3


def test_zero_hpz_is_checked_and_reaches_the_deepspeed_config(tmp_path):
    msg = _err(tmp_path, "name: x\n", ["cluster.nproc=6", "parallel.zero_hpz=4"])
    assert "parallel.zero_hpz=4" in msg and "does not divide the world size 6" in msg
    assert "zero_stage 3" in _err(tmp_path, "name: x\n", ["parallel.zero_stage=2", "parallel.zero_hpz=2"])
    assert "parallel.zero_hpz" in _err(tmp_path, "name: x\n", ["parallel.zero_hpz=-1"])
    assert "parallel.max_reuse_distance" in _err(tmp_path, "name: x\n", ["parallel.max_reuse_distance=-1"])
    cfg = load_config(ROOT / "recipes/debug.yaml", ["parallel.zero_hpz=2", "parallel.max_reuse_distance=0"])
    check_layout(cfg, 4, "--nproc 4")  # a one-process recipe that --nproc 2, 4, ... completes
    with pytest.raises(RecipeError, match=r"^--nproc 3: parallel.zero_hpz=2 does not divide the world size 3"):
        check_layout(cfg, 3, "--nproc 3")
    zero = deepspeed_config(cfg, ParallelDims(world=4, rank=0), torch.device("cpu"))["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 2 and zero["stage3_max_reuse_distance"] == 0
    plain = load_config(ROOT / "recipes/debug.yaml")
    assert deepspeed_config(plain, ParallelDims(world=4, rank=0),
                            torch.device("cpu"))["zero_optimization"]["zero_hpz_partition_size"] == 1


def test_an_elastic_layout_must_fit_every_world_ray_may_pick(tmp_path):
    # min 2 .. max 4: Ray may restart at 3, which sp 2 does not divide
    msg = _err(tmp_path, "name: x\n", ["cluster.nproc=4", "cluster.elastic=true", "cluster.min_nproc=2",
                                       "parallel.ulysses=2"])
    assert "cluster.min_nproc=2" in msg and "does not divide 3" in msg, msg
    msg = _err(tmp_path, "name: x\n", ["cluster.nproc=4", "cluster.elastic=true", "cluster.min_nproc=5"])
    assert "cluster.min_nproc=5 exceeds the largest world size 4" in msg, msg
    msg = _err(tmp_path, "name: x\n", ["cluster.min_nproc=0"])
    assert "cluster.min_nproc" in msg
    msg = _err(tmp_path, "name: x\n", ["cluster.resize_check_s=0"])
    assert "cluster.resize_check_s" in msg
    cfg = load_config(ROOT / "recipes/debug.yaml", ["cluster.nproc=4", "cluster.elastic=true", "cluster.min_nproc=4",
                                                    "parallel.ulysses=2"])  # a fixed size in all but name
    check_elastic(cfg, 4, "--nproc 4")
    cfg = load_config(ROOT / "recipes/debug.yaml", ["cluster.elastic=true", "cluster.min_nproc=2"])
    check_elastic(cfg, 4, "--nproc 4")  # sp 1 fits 2, 3 and 4
    with pytest.raises(RecipeError, match=r"^--nproc 6: cluster.elastic: .*does not divide 3"):
        check_elastic(load_config(ROOT / "recipes/debug.yaml", ["parallel.ulysses=2", "cluster.elastic=true",
                                                                "cluster.min_nproc=2"]), 6, "--nproc 6")


@pytest.mark.parametrize("override, key, expected", [
    ("data.text_tokens=[16,4]", "data.text_tokens", "0 <= min <= max"),
    ("data.text_tokens=[4]", "data.text_tokens", "[min, max]"),
    ("data.sizes=[]", "data.sizes", "at least one"),
    ("data.sizes=[[0,8]]", "data.sizes", "positive [H, W]"),
    ("data.synthetic_videos=0", "data.synthetic_videos", "positive"),
    ("data.drop_min_tokens=-1", "data.drop_min_tokens", ">= 0"),
    ("data.clip_frames=0", "data.clip_frames", "positive"),
    ("data.max_area=-1", "data.max_area", ">= 0"),
    ("data.max_clips=-1", "data.max_clips", ">= 0 (0 = no limit)"),
    ("data.shard_max_bytes=0", "data.shard_max_bytes", "positive"),
    ("logging.sample_every=-5", "logging.sample_every", "0 (off) or a positive integer"),
    ("logging.split_every=-1", "logging.split_every", "0 (off) or a positive integer"),
    ("checkpoint.keep_every=-3", "checkpoint.keep_every", "0 (off) or a positive integer"),
    ("train.val_every=-2", "train.val_every", "0 (only at the end) or a positive integer"),
    ("parallel.reduce_bucket_size=-1", "parallel.reduce_bucket_size", ">= 0"),
    ("parallel.prefetch_bucket_size=-1", "parallel.prefetch_bucket_size", ">= 0"),
    ("parallel.persistence_threshold=-1", "parallel.persistence_threshold", ">= 0"),
    ("vae.mults=[]", "vae.mults", "non-empty"),
    ("vae.base=0", "vae.base", "positive"),
    ("vae.z_dim=0", "vae.z_dim", "positive"),
    ("vae.num_res=-1", "vae.num_res", ">= 0"),
    ("vae.crop=[64]", "vae.crop", "[H, W]"),
    ("vae.frames=0", "vae.frames", "positive"),
    ("vae.val_clips=-1", "vae.val_clips", ">= 0")])
def test_lists_ranges_and_counts_are_checked_when_the_recipe_loads(tmp_path, override, key, expected):
    """Values that used to pass and then fail in a rank (torch.randint on an empty or reversed
    range) or act silently as something else (a negative period as its absolute value, or off)."""
    msg = _err(tmp_path, "name: x\n", [override])
    assert f"key '{key}'" in msg and expected in msg, msg


def test_only_the_dit_is_sequence_parallel_and_only_the_vae_validates_periodically(tmp_path):
    for layout in ("parallel.ulysses=2", "parallel.ring=2"):
        msg = _err(tmp_path, f"base: {ROOT / 'recipes/vae-debug.yaml'}\n", [layout])
        assert "task 'vae' has no sequence-parallel attention" in msg and "parallel.ulysses=1" in msg, msg
    msg = _err(tmp_path, "name: x\n", ["train.val_every=10"])
    assert "train.val_every" in msg and "final.json" in msg and "task: vae" in msg, msg
    assert load_config(ROOT / "recipes/vae-debug.yaml", ["train.val_every=10"]).train.val_every == 10
    msg = _err(tmp_path, "name: x\n", ["logging.sample_every=5", "logging.sample_prompts=[]"])
    assert "logging.sample_prompts" in msg, msg
