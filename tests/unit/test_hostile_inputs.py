"""Inputs nobody should send, each refused in one line before anything runs on its behalf."""
import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from vidscale.cluster.job import new_job
from vidscale.cluster.ray_cluster import DEFAULT_DIR, new_token, private_dir, read_head
from vidscale.cluster.slurm import plan
from vidscale.data.shards import ShardSource, ShardWriter
from vidscale.scaling.checkpoint import zero
from vidscale.scaling.checkpoint.storage import CheckpointError, step_of
from vidscale.scaling.cli import cancel
from vidscale.scaling.config import load_config

from conftest import ROOT  # noqa: E402

MODEL = {"patch": (1, 2, 2), "channels": 4, "text_dim": 16}


def _shards(root):
    w = ShardWriter(root, max_bytes=1 << 20, patch=MODEL["patch"])
    w.write(torch.zeros(4, 1, 4, 4), torch.zeros(3, 16), {"caption": "c"})
    w.close(channels=4, text_dim=16)


# A shard name in index.json that webdataset would open as something other than a local tar.
HOSTILE_SHARD_NAMES = [
    "pipe:touch {marker}; cat shard-000000.tar",
    "../shard-000000.tar",
    "{root}/shard-000000.tar",  # absolute
    "http://example.invalid/shard-000000.tar",
    "gs://bucket/shard-000000.tar",
    "shard-000000.tar\n",
    "sub/shard-000000.tar",
    "shard-000000.tar.gz",
    None,
]


@pytest.mark.parametrize("name", HOSTILE_SHARD_NAMES)
def test_index_shard_names_outside_the_source_are_refused(tmp_path, name):
    root, marker = tmp_path / "src", tmp_path / "ran"
    _shards(root)
    index = json.loads((root / "index.json").read_text())
    if name is not None:
        name = name.format(marker=marker, root=root)
    index["shards"][0]["name"] = name
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: shard name .* is not a file name like 'shard-000000.tar'") as e:
        src = ShardSource(root, seed=0, **MODEL)
        list(src.stream([0]))
    assert "\n" not in str(e.value) and repr(name) in str(e.value)
    assert not marker.exists()


def test_a_source_folder_named_like_a_url_is_read_as_a_folder(tmp_path, monkeypatch):
    """`data.source` is the user's: a folder called `pipe:...` (or `http:...`) holds shards
    like any other, and nothing runs a shell or fetches a URL for it."""
    monkeypatch.chdir(tmp_path)
    for folder in ("pipe:touch ran;", "http:x"):
        _shards(tmp_path / folder)
        src = ShardSource(folder, seed=0, **MODEL)  # relative, as a recipe would give it
        (i, sample, err), = src.stream([0])
        assert sample is not None and err == "" and sample[0].shape == (4, 1, 4, 4), err
    assert not (tmp_path / "ran").exists()


def _index_lie(index):
    index["shards"][0]["samples"] += 1


def _duplicate_key(index):
    index["shards"][0]["keys"][1] = index["shards"][0]["keys"][0]


def _bad_shape(index):
    index["shards"][0]["shapes"][0] = [1, 4]


def _total_lie(index):
    index["samples"] += 3


@pytest.mark.parametrize("lie, says", [
    (_index_lie, r"shard shard-000000.tar: 'samples' is 3 but it lists 2 keys and 2 shapes"),
    (_duplicate_key, r"shard shard-000000.tar: a sample key is listed twice"),
    (_bad_shape, r"shard shard-000000.tar: sample '000000000' has shape \[1, 4\] \(expected \[T, H, W\]"),
    (_total_lie, r"'samples' is 5 but its shards list 2 samples"),
])
def test_an_index_that_lies_about_its_samples_is_refused_naming_the_shard(tmp_path, lie, says):
    """The loader plans from the index's counts and reads by key: counts that disagree would
    repeat or drop samples without a word."""
    root = tmp_path / "src"
    w = ShardWriter(root, max_bytes=1 << 20, patch=MODEL["patch"])
    for _ in range(2):
        w.write(torch.zeros(4, 1, 4, 4), torch.zeros(3, 16), {"caption": "c"})
    w.close(channels=4, text_dim=16)
    index = json.loads((root / "index.json").read_text())
    lie(index)
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: " + says) as e:
        ShardSource(root, seed=0, **MODEL)
    assert "\n" not in str(e.value)


def test_a_sample_unlike_its_index_entry_is_an_error_of_that_sample(tmp_path):
    """The index says 1x4x4 (4 tokens) but the tar holds a 2x4x4 latent: the packer planned
    with 4 tokens, so the sample is refused (skipped or failed by data.on_error), not packed."""
    root = tmp_path / "src"
    _shards(root)
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["shapes"][0] = [2, 4, 4]
    (root / "index.json").write_text(json.dumps(index))
    (i, sample, err), = ShardSource(root, seed=0, **MODEL).stream([0])
    assert sample is None and err == ("shard-000000.tar:000000000: ValueError: latent of shape [4, 1, 4, 4], "
                                      "but the index says [4, 2, 4, 4]"), err


# A value that ends in a newline: `re.match(...$)` accepts it, and on an `#SBATCH` line it
# ends the header, so sbatch ignores every option after it.
HOSTILE_SLURM_VALUES = [
    ("train.run_dir", "{tmp}/run\n"),
    ("cluster.slurm.partition", "gpu\n"),
    ("cluster.slurm.account", "acct\n"),
    ("cluster.slurm.qos", "high\n"),
    ("cluster.slurm.constraint", "a100\n"),
    ("cluster.slurm.time", "10\n"),
    ("cluster.slurm.extra", ["--exclusive\n"]),
]


@pytest.mark.parametrize("key,value", HOSTILE_SLURM_VALUES)
def test_slurm_values_with_a_trailing_newline_are_refused(tmp_path, key, value):
    cfg = load_config(ROOT / "recipes/debug.yaml", [f"train.run_dir={tmp_path / 'run'}", "cluster.nproc=2",
                                                     "parallel.zero_stage=3"])
    section, field = key.rsplit(".", 1)
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, field, value.format(tmp=tmp_path) if isinstance(value, str) else value)
    with pytest.raises(ValueError) as e:
        plan(cfg)
    assert "\n" not in str(e.value) and key in str(e.value), str(e.value)


def test_checkpoint_tag_with_a_trailing_newline_is_not_a_step():
    assert step_of("step_00000004") == 4
    assert step_of("step_00000004\n") is None


# job.json job ids that scancel would read as options or as someone else's jobs.
HOSTILE_SLURM_JOB_IDS = ["--me", "-u", "123 456", "123\n", "12;rm", "", "123_", 123]


@pytest.mark.parametrize("job_id", HOSTILE_SLURM_JOB_IDS)
def test_cancel_refuses_job_ids_that_are_not_slurm_ids(tmp_path, monkeypatch, job_id):
    bin_dir, marker = tmp_path / "bin", tmp_path / "scancelled"
    bin_dir.mkdir()
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    (bin_dir / "scancel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "run"
    new_job("slurm", run, ["vidscale", "train"], job_ids=[job_id], state="RUNNING").save()
    with pytest.raises(ValueError) as e:
        cancel.run(argparse.Namespace(run_dir=str(run)))
    assert "\n" not in str(e.value) and "job.json" in str(e.value) and repr(job_id) in str(e.value)
    assert not marker.exists()


def test_cancel_does_not_signal_a_recycled_pid(tmp_path):
    # a vidscale-looking process that is not the one job.json recorded (other start time)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "vidscale"])
    try:
        run = tmp_path / "run"
        job = new_job("local", run, ["vidscale", "train"], state="RUNNING", pid=other.pid)
        job.pid_start -= 100
        job.save()
        with pytest.raises(ValueError, match="not running"):
            cancel.run(argparse.Namespace(run_dir=str(run)))
        time.sleep(0.2)
        assert other.poll() is None, "a process that job.json did not record was signalled"
        # the recorded one (same start time) is
        new_job("local", run, ["vidscale", "train"], state="RUNNING", pid=other.pid).save()
        assert cancel.run(argparse.Namespace(run_dir=str(run))) == 0
        assert other.wait(timeout=10) == -signal.SIGTERM
    finally:
        other.kill()


def _symlink_to_elsewhere(path, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    path.symlink_to(tmp_path / "elsewhere")


def _owned_by_someone_else(path, tmp_path):
    path.mkdir(mode=0o777)
    os.chown(path, os.getuid() + 1, -1)


def _a_file(path, tmp_path):
    path.write_text("")


# What another user of the machine could leave where the Ray head's directory goes.
HOSTILE_RAY_DIRS = [_symlink_to_elsewhere, _owned_by_someone_else, _a_file]


@pytest.mark.parametrize("plant", HOSTILE_RAY_DIRS)
def test_ray_directory_planted_by_someone_else_is_refused(tmp_path, plant):
    if plant is _owned_by_someone_else and os.getuid() != 0:
        pytest.xfail("only root can give a directory to another user")
    d = tmp_path / "vidscale-ray-x"
    plant(d, tmp_path)
    with pytest.raises(ValueError, match=r"Ray directory .*vidscale-ray-x") as e:
        private_dir(d)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="Ray directory"):
        read_head(d)


def test_ray_default_directory_is_private_to_its_user(tmp_path):
    assert DEFAULT_DIR == f"/tmp/vidscale-ray-{os.getuid()}" and len(DEFAULT_DIR) < 40
    d = private_dir(tmp_path / "fresh")
    assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o700
    token = new_token(d / "auth_token")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64


class _Payload:
    """What a crafted shard could hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_pickle(path, marker):
    torch.save({"optimizer_state_dict": _Payload(marker), "w": torch.zeros(2)}, path)


def _legacy_pickle(path, marker):
    torch.save({"optimizer_state_dict": _Payload(marker)}, path, _use_new_zipfile_serialization=False)


def _through_deepspeeds_engine(path):
    zero._engine_class()().load(str(path), map_location="cpu")


def _through_deepspeeds_own_torch_load(path):
    with zero.weights_only_loads():  # how DeepSpeed's loaders, ds_to_universal and zero_to_fp32 call it
        torch.load(path, map_location="cpu", weights_only=False)


# A ZeRO shard whose pickle calls something when loaded, written two ways, read every way we read them.
HOSTILE_SHARDS = [(w, r) for w in (_zip_pickle, _legacy_pickle)
                  for r in (zero.load_torch, _through_deepspeeds_engine, _through_deepspeeds_own_torch_load)]


@pytest.mark.parametrize("write,read", HOSTILE_SHARDS)
def test_crafted_zero_shard_is_refused_not_executed(tmp_path, write, read):
    path, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ran"
    write(path, marker)
    with pytest.raises(CheckpointError) as e:
        read(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused to unpickle" in msg and "system" in msg, msg
    assert not marker.exists()
    assert torch.load is zero._torch_load  # the patch is gone again
