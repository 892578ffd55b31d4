"""Recipes: every shipped recipe loads; mistakes are one-line errors naming file and key."""
from pathlib import Path

import pytest

from vidscale.scaling.config import RecipeError, load_config

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


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    msg = _err(tmp_path, "train: [unclosed\n")
    assert "bad.yaml" in msg and "YAML" in msg


def test_base_recipe_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {ROOT / 'recipes/debug.yaml'}\ntrain:\n  steps: 7\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 7 and cfg.model.size == "debug"
