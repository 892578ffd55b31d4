"""Images with videos, and mixtures of prepared sets (`data.sources`): an image folder and a
video folder prepared by `prepare`, mixed 1:3 by tokens; each source's exactly-once epochs,
exact resume (loader and training loop) and dp remapping; the one-line recipe errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidscale.data.loader import remap_loader_states
from vidscale.data.prepare import prepare
from vidscale.data.shapes import render
from vidscale.data.shards import ShardSource
from vidscale.data.video import write_video
from vidscale.scaling.config import RecipeError, load_config
from vidscale.scaling.train.loop import train
from vidscale.scaling.train.metrics import read_metrics

from conftest import DEBUG, QUIET, loader_for, write_shards

BUDGET = 32


def _sources(*pairs) -> str:
    """data.sources=[{path: A, weight: W}, ...] as a --set override."""
    return "data.sources=[" + ", ".join(f"{{path: '{p}', weight: {w}}}" for p, w in pairs) + "]"


def mixed_cfg(*pairs, over=()):
    return load_config(DEBUG, [_sources(*pairs), f"train.tokens_per_batch={BUDGET}", "data.lookahead=8",
                               "data.shuffle_buffer=16", *QUIET, *over])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """An image set (40 png/jpg/webp of two sizes) and a video set (36 mp4 of 36 frames, four
    9-frame clips each), both through `prepare` with the debug model's patch: 1-frame latents
    of 6 or 12 tokens, and 3-frame latents of 18 tokens."""
    root = tmp_path_factory.mktemp("mix")
    imgs, vids = root / "images", root / "videos"
    imgs.mkdir()
    vids.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        H, W = (32, 48) if i % 2 else (48, 64)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(imgs / f"i{i:02d}.{['png', 'jpg', 'webp'][i % 3]}")
    for i in range(36):
        write_video(vids / f"v{i:02d}.mp4", render(["circle", "square"][i % 2], "red", "blue", "right", 32, 48, 36,
                                                   seed=i), fps=8)
    cfg = load_config(DEBUG, ["data.clip_frames=9", "data.max_clips=4"])
    kw = dict(channels=cfg.model.in_channels, patch=cfg.model.patch, progress=False)
    prepare(imgs, root / "img_shards", cfg.data, **kw)
    prepare(vids, root / "vid_shards", cfg.data, **kw)
    return root / "img_shards", root / "vid_shards"


def test_image_set_and_video_set_mix_1_to_3_by_tokens_over_an_epoch(prepared):
    img, vid = prepared
    assert {s[0] for sh in json.loads((img / "index.json").read_text())["shards"] for s in sh["shapes"]} == {1}
    ld = loader_for(mixed_cfg((img, 1), (vid, 3)))
    vid_loader = ld.loaders[1]
    n_vid = len(vid_loader.source)
    seen: dict[str, list[str]] = {"images": [], "videos": []}
    tokens = {"img_shards": 0, "vid_shards": 0}
    while len(seen["videos"]) < n_vid:  # one whole epoch of the video set
        _, meta = next(ld)
        name = meta.names[0].split("/")[0]
        assert all(n.startswith(name + "/") for n in meta.names)  # a batch comes from one source
        tokens[name] += meta.num_real
        seen["videos" if name == "vid_shards" else "images"] += meta.names
        # the schedule keeps the two within about one batch of the 1:3 ratio at every step
        assert abs(tokens["img_shards"] - tokens["vid_shards"] / 3) <= BUDGET
    videos = seen["videos"]
    assert vid_loader.epoch == 0 and len(videos) == n_vid == len(set(videos)) == 144  # every clip exactly once
    ratio = tokens["img_shards"] / tokens["vid_shards"]
    assert abs(ratio * 3 - 1) <= 0.02 and sum(tokens.values()) > 3000, tokens  # 1:3 within 2%
    assert ld.source_tokens == tokens
    n_img = len(ld.loaders[0].source)  # the smaller image set went round several epochs, each whole
    per_epoch = len(seen["images"]) // n_img
    assert per_epoch >= 2 and all(seen["images"].count(n) >= per_epoch for n in set(seen["images"]))


def test_mixture_resume_and_remap_keep_each_source_exactly_once(tmp_path):
    a, b = write_shards(tmp_path / "a", n=23, seed=1), write_shards(tmp_path / "b", n=31, seed=2)
    big = ["train.tokens_per_batch=64"]  # write_shards' samples have up to 36 tokens
    cfg = mixed_cfg((a, 1), (b, 2), over=["data.workers=1", *big])
    ref = loader_for(cfg, 1, 2)
    want = [next(ref) for _ in range(12)]
    ld = loader_for(cfg, 1, 2)
    for _ in range(5):
        next(ld)
    sd = json.loads(json.dumps(ld.state_dict()))  # what a checkpoint stores
    back = loader_for(mixed_cfg((a, 1), (b, 2), over=big), 1, 2)  # any number of workers
    back.load_state_dict(sd)
    for k in range(5, 12):
        tokens, meta = next(back)
        assert meta.names == want[k][1].names and torch.equal(tokens, want[k][0]), k
    with pytest.raises(ValueError, match="mixes sources"):
        loader_for(mixed_cfg((b, 2), (a, 1), over=big), 1, 2).load_state_dict(sd)
    with pytest.raises(ValueError, match="mixture"):
        loader_for(load_config(DEBUG, [f"data.source={a}", *big]), 1, 2).load_state_dict(sd)

    # 2 dp ranks -> 3: every sample of each source's unfinished epoch is taken exactly once
    cfg = mixed_cfg((a, 1), (b, 2), over=big)
    old = [loader_for(cfg, r, 2) for r in range(2)]
    taken: dict[tuple[str, int], list[str]] = {}
    for r, steps in ((0, 3), (1, 7)):
        for _ in range(steps):
            meta = next(old[r])[1]
            src = meta.names[0].split("/")[0]
            taken.setdefault((src, old[r].loaders[src == "b"].epoch), []).extend(meta.names)
    states = remap_loader_states([json.loads(json.dumps(o.state_dict())) for o in old], 3)
    assert sum(s["tokens"][0] for s in states) == sum(o.tokens[0] for o in old)
    new = [loader_for(cfg, r, 3) for r in range(3)]
    last = {s: max(e for (n, e) in taken if n == s) for s in ("a", "b")}
    for ld, st in zip(new, states):
        ld.load_state_dict(st)
        for _ in range(40):
            meta = next(ld)[1]
            src = meta.names[0].split("/")[0]
            e = ld.loaders[src == "b"].epoch
            if e <= last[src]:
                taken.setdefault((src, e), []).extend(meta.names)
    for (src, e), names in taken.items():
        if e <= last[src]:
            assert len(names) == len(set(names)) == (23 if src == "a" else 31), (src, e, len(names))


def test_training_on_a_mixture_resumes_bit_for_bit(prepared, tmp_path):
    """Stopped mid-epoch at step 4 and resumed: the same samples (consumed records) and the
    same losses and token shares as the uninterrupted run, bit for bit."""
    img, vid = prepared
    common = ["parallel.zero_stage=0", "train.steps=8", "checkpoint.every=4", "logging.every=2",
              "data.record_consumed=true", "train.val_videos=2"]
    train(mixed_cfg((img, 1), (vid, 3), over=[f"train.run_dir={tmp_path / 'a'}", *common]))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "loader" / "dp00000.json").read_text())
    assert all(s["epoch"] == 0 and s["batch"] > 0 for s in state["loaders"])  # mid-epoch of both sources
    train(mixed_cfg((img, 1), (vid, 3), over=[f"train.run_dir={tmp_path / 'b'}", f"checkpoint.resume={ckpt}",
                                              *common]))
    a = {r["step"]: r for r in read_metrics(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r for r in read_metrics(tmp_path / "b") if "loss" in r}
    assert sorted(b) == [6, 8]
    for s in b:
        assert a[s]["loss"] == b[s]["loss"] and a[s]["source_tokens"] == b[s]["source_tokens"], s
    share = a[8]["source_share"]
    assert set(share) == {"img_shards", "vid_shards"} and abs(sum(share.values()) - 1) < 1e-9
    consumed = lambda run: [r for r in map(json.loads, (run / "consumed" / "dp00000.jsonl").read_text().splitlines())  # noqa: E731
                            if r["step"] > 4]
    assert consumed(tmp_path / "b") == consumed(tmp_path / "a") != []


def test_sources_recipe_errors_are_one_line(tmp_path):
    a = write_shards(tmp_path / "a", n=4)
    for over, msg in [([_sources((a, 0))], "data.sources[0].weight"),
                      ([f"data.source={a}", _sources((a, 1))], "both set"),
                      ([_sources((a, 1), (tmp_path / "x" / "a", 1))], "give one a 'name'")]:
        with pytest.raises(RecipeError, match=msg.replace("[", r"\[")) as e:
            load_config(DEBUG, over)
        assert "\n" not in str(e.value)
    for path, msg in [(tmp_path / "missing", "no such directory"), (tmp_path, "no index.json")]:
        with pytest.raises(ValueError, match=r"data.sources\[1\].path = .*" + msg):
            loader_for(mixed_cfg((a, 1), (path, 1), over=["train.tokens_per_batch=64"]))
    assert ShardSource(a, seed=0, patch=(1, 2, 2), label="x").name(0).startswith("x/shard-")
