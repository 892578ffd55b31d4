"""Inputs nobody should send, each refused in one line before anything runs on its behalf."""
import json

import pytest
import torch

from vidscale.cluster.slurm import plan
from vidscale.data.shards import ShardSource, ShardWriter
from vidscale.scaling.checkpoint.storage import step_of
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
