"""The wandb sink in this process, offline: png samples handed to it reach wandb as the frames of
their prompt at their own step; a sink that cannot start says so in one line and then does nothing."""
import os

import numpy as np
import pytest
import wandb
from PIL import Image

from vidscale.scaling.config import LoggingArgs, RecipeError, load_config
from vidscale.scaling.train.metrics import MetricsLogger
from vidscale.scaling.train.wandb_sink import WandbSink

from conftest import DEBUG  # noqa: E402
from wandb_log import offline_run, offline_runs  # noqa: E402


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """wandb's own directories under tmp_path, no setting of this machine's; torn down after."""
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    for k, d in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                 ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(k, str(tmp_path / "wandb-home" / d))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    yield
    wandb.teardown()


def test_png_samples_go_to_their_own_step(tmp_path, wandb_home):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    sink = WandbSink(run, LoggingArgs(wandb=True, wandb_mode="offline"), config={"train": {"steps": 4}}, group="g")
    assert sink.active
    log = MetricsLogger(run, True, tensorboard=False, progress=False, sinks=[sink])
    log.log(2, {"loss": 0.5})
    written = []
    for f in range(3):  # what TrainingSamples writes at step 3 with sample_format png
        written.append(run / "samples" / f"step_0000003_0_{f:04d}.png")
        Image.fromarray(np.full((4, 6, 3), 40 * f, np.uint8)).save(written[-1])
    log.files(written)  # what the loop hands over after the step hook
    # a sample file nobody handed over (an earlier run's) is not uploaded: the sink lists no directory
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(run / "samples" / "step_0000004_1_0000.png")
    log.log(4, {"loss": 0.25, "tokens": 96})
    log.close()
    # what a training process's exit does: wait for wandb's service to write all it was sent
    # (finish() can return before the run record is in the offline file)
    wandb.teardown()
    (path,) = offline_runs(run)
    run_id, config, history = offline_run(path)
    assert run_id == (run / "wandb" / "run_id").read_text().strip() and config["train"] == {"steps": 4}
    assert sorted(history) == [2, 3, 4]
    assert history[2]["loss"] == 0.5 and history[4]["loss"] == 0.25 and history[4]["tokens"] == 96
    assert history[3]["samples/0._type"] == "images/separated" and history[3]["samples/0.count"] == 3
    assert not [k for k in history[4] if k.startswith("samples/")]


def test_a_sink_that_cannot_start_warns_once_and_does_nothing(tmp_path, wandb_home, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # no API key: wandb refuses to start
    run = tmp_path / "run"
    run.mkdir()
    sink = WandbSink(run, LoggingArgs(wandb=True, wandb_mode="online", wandb_timeout_s=5), config={}, group="g")
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not sink.active and not list(run.glob("wandb/*run-*"))
    lines = [line for line in capfd.readouterr().err.splitlines() if "logging.wandb" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: logging.wandb: could not start"), lines


@pytest.mark.parametrize("over, key, expected", [
    ("logging.wandb_mode=cloud", "logging.wandb_mode", "online, offline, disabled"),
    ("logging.wandb_timeout_s=0", "logging.wandb_timeout_s", "a positive number of seconds"),
    ("logging.wandb_timeout_s=200", "logging.wandb_timeout_s", "at most half of parallel.timeout_s = 300"),
])
def test_wandb_keys_are_checked_when_the_recipe_loads(over, key, expected):
    with pytest.raises(RecipeError) as e:
        load_config(DEBUG, ["logging.wandb=true", over])
    msg = str(e.value)
    assert "\n" not in msg and f"key '{key}'" in msg and expected in msg, msg
