"""User mistakes on the command line are one line naming the file, key or value, with exit code
2, never a traceback: a `--set` value that is not YAML, a results CSV with an infinite value,
sampling sizes and steps no sampler can use, a damaged job.json."""
import csv
import json

import pytest

from vidscale.models.dit import VideoDiT
from vidscale.scaling.checkpoint.weights import save_weights
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


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"state": "RUNNING"}'])
def test_status_names_a_damaged_job_record(tmp_path, capsys, text):
    (tmp_path / "job.json").write_text(text)
    err = one_line_error(capsys, ["status", tmp_path])
    assert str(tmp_path / "job.json") in err
