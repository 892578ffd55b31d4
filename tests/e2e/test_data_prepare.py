"""`vidscale prepare` on small real video files written here with PyAV (two resolutions,
mp4 and webm, one corrupt file), then the training loop on the prepared shards."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from vidscale.data.prepare import prepare
from vidscale.data.shapes import render
from vidscale.data.shards import ShardSource, merge_parts
from vidscale.data.video import decode_clips, write_video
from vidscale.models.latent import PixelEncoder
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import train
from vidscale.scaling.train.metrics import read_metrics

from conftest import DEBUG, QUIET, vidscale  # noqa: E402

pytestmark = pytest.mark.e2e


def make_src(src: Path) -> None:
    src.mkdir()
    specs = [("a.mp4", 32, 48, 9), ("b.mp4", 48, 64, 18), ("c.webm", 48, 64, 13), ("d.mp4", 32, 48, 18),
             ("e.mp4", 48, 64, 9), ("f.mp4", 32, 48, 12)]
    for k, (name, H, W, T) in enumerate(specs):
        shape = ["circle", "square", "triangle"][k % 3]
        write_video(src / name, render(shape, "red", "blue", "right", H, W, T, seed=k), fps=8)
    for name in ("a.mp4", "b.mp4", "c.webm"):
        (src / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 300)  # not a video
    (src / "captions.jsonl").write_text("\n".join(json.dumps({"file": n, "caption": f"sidecar {n}"})
                                                  for n in ("d.mp4", "e.mp4", "f.mp4")))


def _assert_same_shard(a: Path, b: Path) -> None:
    """Same members, same metadata and latents byte for byte; caption embeddings equal up to one
    bf16 rounding step: the text encoder's BLAS reductions may round differently in another
    process (seen: 1-4 of ~3000 values one ULP apart between the CLI and the test process)."""
    ta, tb = tarfile.open(a), tarfile.open(b)
    ma, mb = ta.getmembers(), tb.getmembers()
    assert [m.name for m in ma] == [m.name for m in mb], a
    for x, y in zip(ma, mb):
        da, db = ta.extractfile(x).read(), tb.extractfile(y).read()
        if not x.name.endswith(".safetensors"):
            assert da == db, (a, x.name)
            continue
        sa, sb = load(da), load(db)
        assert sorted(sa) == sorted(sb) and torch.equal(sa["latent"], sb["latent"]), (a, x.name)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, (a, x.name, k)
            torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=2 ** -7, atol=0)


def test_prepare_real_videos_then_train_on_the_shards(tmp_path):
    src, out = tmp_path / "videos", tmp_path / "shards"
    make_src(src)
    r = vidscale("prepare", src, out, "--no-progress", "--set", "data.clip_frames=9", "--set", "data.max_clips=2",
                 "--set", f"data.captions={src / 'captions.jsonl'}", "--set", "data.shard_max_bytes=30000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 1 unreadable video" in r.stdout and "broken.mp4" in r.stderr
    index = json.loads((out / "index.json").read_text())
    # clips of 9 frames: 18-frame videos give 2, the 12-frame one gives 1 (the rest is dropped)
    assert index["samples"] == 1 + 2 + 1 + 2 + 1 + 1 and index["failed"] == 1 and index["videos"] == 7
    assert index["channels"] == 4 and index["text_dim"] == 384 and len(index["shards"]) >= 2

    cfg = load_config(DEBUG, [f"data.source={out}"])
    source = ShardSource(out, seed=cfg.train.seed, patch=cfg.model.patch, channels=cfg.model.in_channels,
                         text_dim=cfg.model.text_dim, tokens_per_batch=cfg.train.tokens_per_batch)
    samples = {s[2]["source"].split("/")[-1] + str(s[2]["frame_range"]): s for _, s, _ in source.stream(
        list(range(len(source))))}
    lat, text, meta = samples["b.mp4[9, 18]"]
    assert lat.shape == (4, 3, 6, 8) and meta["orig_size"] == [48, 64] and meta["fps"] == 8.0
    assert meta["caption"] == "caption of b.mp4" and text.shape[1] == 384
    assert samples["f.mp4[0, 9]"][2]["caption"] == "sidecar f.mp4"
    assert samples["a.mp4[0, 9]"][0].shape == (4, 3, 4, 6)
    # the stored latent is the pixel encoding of the decoded frames (bf16 on disk)
    clip = list(decode_clips(src / "b.mp4", 9, 16))[1]
    x = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert torch.allclose(lat.float(), PixelEncoder(4).encode(x)[0], atol=0.02)

    # decoding in worker processes writes the same bytes
    pcfg = load_config(None, ["data.clip_frames=9", "data.max_clips=2", f"data.captions={src / 'captions.jsonl'}",
                              "data.shard_max_bytes=30000"])
    model = {"channels": pcfg.model.in_channels, "patch": pcfg.model.patch}
    again = prepare(src, tmp_path / "again", pcfg.data, progress=False, workers=2, **model)
    assert [s["name"] for s in again["shards"]] == [s["name"] for s in index["shards"]]
    for s in index["shards"]:
        _assert_same_shard(tmp_path / "again" / s["name"], out / s["name"])

    # two parallel parts into one folder: the last one to finish writes the joint index
    assert prepare(src, tmp_path / "parts", pcfg.data, progress=False, part=(1, 2), **model)["samples"] > 0
    assert merge_parts(tmp_path / "parts", 2) is None and not (tmp_path / "parts" / "index.json").exists()
    prepare(src, tmp_path / "parts", pcfg.data, progress=False, part=(0, 2), **model)
    joint = merge_parts(tmp_path / "parts", 2)
    assert joint["samples"] == index["samples"] and joint["failed"] == 1 and joint["videos"] == 7
    parts = ShardSource(tmp_path / "parts", seed=pcfg.train.seed, patch=pcfg.model.patch,
                        channels=pcfg.model.in_channels, text_dim=pcfg.model.text_dim,
                        tokens_per_batch=pcfg.train.tokens_per_batch)
    got = {(m["source"], tuple(m["frame_range"])) for _, (_, _, m), _ in
           parts.stream(list(range(joint["samples"])))}
    assert got == {(m["source"], tuple(m["frame_range"])) for _, _, m in samples.values()}

    run = tmp_path / "run"
    cfg = load_config(DEBUG, [f"data.source={out}", f"train.run_dir={run}", "train.steps=40",
                              "train.tokens_per_batch=128", "logging.every=1", *QUIET, "checkpoint.every=0",
                              "parallel.zero_stage=0"])
    train(cfg)
    recs = read_metrics(run)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert 0 < recs[-1]["packing_efficiency"] <= 1


def test_missing_or_mismatched_source_fails_before_training(tmp_path):
    r = vidscale("train", "recipes/debug.yaml", "--set", f"data.source={tmp_path / 'nothing'}",
                 "--run-dir", tmp_path / "run", timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "data.source" in lines[0] and "no such directory" in lines[0]
    assert not (tmp_path / "run").exists()


