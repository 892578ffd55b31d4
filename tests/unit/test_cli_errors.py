"""User mistakes on the command line are one line naming the file, key or value, with exit code
2, never a traceback: a `--set` value that is not YAML, a results CSV with an infinite value,
sampling sizes and steps no sampler can use, a damaged job.json."""
import csv
import json

import pytest
import torch

from vidscale.models.dit import VideoDiT
from vidscale.scaling.checkpoint.weights import find_weights, save_weights
from vidscale.scaling.cli.main import main
from vidscale.scaling.config import model_config

from conftest import DEBUG, debug_config  # noqa: E402


def one_line_error(capsys, argv, rc=2) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == rc, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_set_value_that_is_not_yaml(capsys):
    err = one_line_error(capsys, ["train", DEBUG, "--set", "train.steps=[1"])
    assert "train.steps=[1" in err and "YAML" in err


def test_fit_names_the_row_with_an_infinite_value(tmp_path, capsys):
    rows = [{"name": f"r{i}", "params": 1e6 * (i + 1), "tokens": 1e8, "loss": 3.0 - 0.1 * i} for i in range(6)]
    rows[2]["params"] = "inf"
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    err = one_line_error(capsys, ["fit", tmp_path / "results.csv", "--bootstrap", "0"])
    assert "results.csv" in err and "r2" in err and "inf" in err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = debug_config()
    model = VideoDiT(model_config(cfg.model))
    model.init_weights()
    return save_weights(model.state_dict(), tmp_path_factory.mktemp("w") / "model.safetensors", cfg)


@pytest.mark.parametrize("flags,names", [(["--height", "0"], "--height 0"), (["--width", "-8"], "--width -8"),
                                         (["--steps", "0"], "--steps 0"), (["--steps", "-3"], "--steps -3"),
                                         (["--strength", "1.5"], "--strength 1.5")])
def test_sample_refuses_sizes_and_steps_it_cannot_use(weights, tmp_path, capsys, flags, names):
    err = one_line_error(capsys, ["sample", weights, "--frames", "1", "--out", tmp_path / "x.png", *flags])
    assert names in err
    assert not list(tmp_path.glob("x*"))


def test_sample_checks_out_before_any_work_and_never_overwrites(weights, tmp_path, capsys):
    # the suffix: refused before the weights load (a run path that does not exist is never read)
    err = one_line_error(capsys, ["sample", tmp_path / "no-such-run", "--out", tmp_path / "x.avi"])
    assert "--out" in err and "x.avi" in err and all(s in err for s in (".mp4", ".gif", ".webm", ".mkv", ".png"))
    # an existing video is kept as it was
    (tmp_path / "old.mp4").write_bytes(b"earlier sample")
    err = one_line_error(capsys, ["sample", tmp_path / "no-such-run", "--out", tmp_path / "old.mp4"])
    assert "already exists" in err and "another --out" in err
    assert (tmp_path / "old.mp4").read_bytes() == b"earlier sample"
    # PNG frames: any frame of an earlier sample (here its 4th) is refused, and nothing is written
    (tmp_path / "s_0003.png").write_bytes(b"frame")
    err = one_line_error(capsys, ["sample", weights, "--frames", "1", "--height", "16", "--width", "16",
                                  "--steps", "1", "--out", tmp_path / "s.png"])
    assert "s_0003.png already exists" in err
    assert sorted(p.name for p in tmp_path.glob("s*")) == ["s_0003.png"]
    # a name that only starts like it is another output: sampling goes ahead
    assert main([str(a) for a in ["sample", weights, "--frames", "1", "--height", "16", "--width", "16",
                                  "--steps", "1", "--out", tmp_path / "s_0003.png.png"]]) == 0
    assert (tmp_path / "s_0003.png_0000.png").is_file()


def test_find_weights_in_a_folder_of_exports_goes_by_their_ema_metadata(tmp_path):
    cfg, state = debug_config(), {"w": torch.zeros(2)}
    for name, ema in (("a_ema.safetensors", True), ("b.safetensors", False)):  # EMA first by name
        save_weights(state, tmp_path / "one" / name, cfg, ema=ema)
    for name, ema in (("a.safetensors", False), ("b_ema.safetensors", True)):  # raw first by name
        save_weights(state, tmp_path / "two" / name, cfg, ema=ema)
    assert find_weights(tmp_path / "one", ema=True).name == "a_ema.safetensors"
    assert find_weights(tmp_path / "one", ema=False).name == "b.safetensors"
    assert find_weights(tmp_path / "two", ema=True).name == "b_ema.safetensors"
    assert find_weights(tmp_path / "two", ema=False).name == "a.safetensors"
    save_weights(state, tmp_path / "three" / "x.safetensors", cfg, ema=True)  # no raw weights at all
    assert find_weights(tmp_path / "three", ema=True).name == "x.safetensors"
    with pytest.raises(ValueError, match="only EMA weights files"):
        find_weights(tmp_path / "three", ema=False)
    save_weights(state, tmp_path / "two" / "c.safetensors", cfg, ema=False)  # two alike: no guess
    with pytest.raises(ValueError, match=r"2 raw weights files \(a.safetensors, c.safetensors\)"):
        find_weights(tmp_path / "two", ema=False)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"state": "RUNNING"}'])
def test_status_names_a_damaged_job_record(tmp_path, capsys, text):
    (tmp_path / "job.json").write_text(text)
    err = one_line_error(capsys, ["status", tmp_path])
    assert str(tmp_path / "job.json") in err
