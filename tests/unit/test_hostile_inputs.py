"""Inputs nobody should send, each refused in one line before anything runs on its behalf."""
import json

import pytest
import torch

from vidscale.data.shards import ShardSource, ShardWriter

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
