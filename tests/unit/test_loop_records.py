"""What the training loop records about its steps: the rate each step trained at, one record
per step across restarts (metrics.jsonl, consumed/, TensorBoard), the final weights' origin,
and a pre-emption at the last step."""
import json
import shutil

import pytest
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vidscale.scaling.checkpoint.rundir import FINISHED_FILES
from vidscale.scaling.checkpoint.weights import save_run_weights
from vidscale.scaling.train import loop, signals, tasks
from vidscale.scaling.train.metrics import read_metrics, scalars

from conftest import short_run


def crashed_after_logging(run, saved_up_to: int) -> None:
    """The run dir as if the process died after logging its last step but before saving it:
    its checkpoints after `saved_up_to` and the files of a finished run are gone."""
    for d in (run / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > saved_up_to:
            shutil.rmtree(d)
    for name in FINISHED_FILES:
        (run / name).unlink()


def consumed(run) -> list[dict]:
    return [json.loads(line) for line in (run / "consumed/dp00000.jsonl").read_text().splitlines()]


def test_the_logged_lr_is_the_rate_each_step_trained_at(tmp_path):
    """Warmup over 10 steps: step s (counted from 1) trains at s/10 of optim.lr, and logs that,
    not the next step's rate."""
    cfg = short_run(tmp_path / "run", "train.steps=3", "optim.warmup=10", "train.val_videos=1")
    loop.train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["lr"] for r in recs] == pytest.approx([cfg.optim.lr * s / 10 for s in (1, 2, 3)], rel=1e-12)


def test_tensorboard_after_a_restart_holds_each_step_once_with_the_restarted_values(tmp_path):
    """Saved at step 4, logged 5 and 6, died; resumed from 4: TensorBoard (read back as its
    EventAccumulator reads it) holds steps 1..6 of every scalar once, 5 and 6 those the resumed
    start logged (tokens_per_s differs between the two starts)."""
    run = tmp_path / "run"
    cfg = short_run(run, "train.steps=6", "checkpoint.every=4", "logging.tensorboard=true", "train.val_videos=1",
                    "checkpoint.resume=auto")
    loop.train(cfg)
    before = {r["step"]: r for r in read_metrics(run)}
    crashed_after_logging(run, saved_up_to=4)
    loop.train(cfg)
    after = {r["step"]: r for r in read_metrics(run)}
    assert sorted(after) == list(range(1, 7)) and after[5]["tokens_per_s"] != before[5]["tokens_per_s"]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    want = {s: scalars(r, dots_as_slashes=True) for s, r in after.items()}
    tags = set(acc.Tags()["scalars"])
    assert tags == set(want[6]) - {"step"}
    for tag in tags:
        got = acc.Scalars(tag)
        assert [e.step for e in got] == list(range(1, 7)), tag
        assert [e.value for e in got] == pytest.approx([want[s][tag] for s in range(1, 7)], rel=1e-6), tag


def test_a_restart_without_a_checkpoint_records_each_step_once(tmp_path):
    """checkpoint.every=0 and a crash before the end: `--resume auto` starts again from step 0,
    and metrics.jsonl and consumed/ hold steps 1..3 once, as an uninterrupted run's."""
    run = tmp_path / "run"
    cfg = short_run(run, "train.steps=3", "checkpoint.every=0", "data.record_consumed=true", "train.val_videos=1",
                    "checkpoint.resume=auto")
    loop.train(cfg)
    once, once_consumed = read_metrics(run), consumed(run)
    crashed_after_logging(run, saved_up_to=0)
    loop.train(cfg)
    again = read_metrics(run)
    assert [r["step"] for r in again] == [r["step"] for r in once] == [1, 2, 3]
    assert [r["loss"] for r in again] == [r["loss"] for r in once]
    assert consumed(run) == once_consumed and sorted({r["step"] for r in once_consumed}) == [1, 2, 3]


def test_the_final_weights_of_a_resumed_run_still_say_where_step_0_came_from(tmp_path):
    """train.init_from, saved at step 2, died after step 3, resumed: the resumed start loads no
    init_from (its weights are its checkpoint's), and its model.safetensors carries the same
    init_from record as an uninterrupted run's."""
    start = tmp_path / "start"
    tr = loop.Trainer(short_run(start))  # freshly initialised weights, as a file to start from
    save_run_weights(tr.engine, start, tr.cfg, 0)
    tr.close()
    tr.dims.destroy()

    def origin(run) -> dict:
        with safe_open(str(run / "model.safetensors"), "pt") as f:
            return json.loads(f.metadata()["init_from"])
    run = tmp_path / "run"
    cfg = short_run(run, "train.steps=3", "checkpoint.every=2", "train.val_videos=1", "checkpoint.resume=auto",
                    f"train.init_from={start / 'model.safetensors'}")
    loop.train(cfg)
    once = origin(run)
    assert once["init_from"] == str((start / "model.safetensors").resolve()) and once["kind"] == "file"
    crashed_after_logging(run, saved_up_to=2)
    loop.train(cfg)
    assert origin(run) == once


def test_a_save_request_at_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    """SIGUSR1's flag set during the last step: the run saves and finishes (final.json) and
    does not ask to be requeued; set one step earlier it stops there, unfinished."""
    after_step = tasks.DiTTask.after_step
    at = {"step": 3}

    def signalled_during(self, engine, step, run_dir):  # the flag SIGUSR1's handler sets
        if step == at["step"]:
            signals.request_save()
        return after_step(self, engine, step, run_dir)
    monkeypatch.setattr(tasks.DiTTask, "after_step", signalled_during)
    cfg = short_run(tmp_path / "last", "train.steps=3", "checkpoint.every=0", "train.val_videos=1")
    out = loop.train(cfg)
    assert out["preempted"] is False and out["steps"] == 3 and (tmp_path / "last/final.json").exists()
    at["step"] = 2
    out = loop.train(short_run(tmp_path / "before", "train.steps=3", "checkpoint.every=0", "train.val_videos=1"))
    signals.clear()
    assert out["preempted"] is True and out["steps"] == 2 and not (tmp_path / "before/final.json").exists()
