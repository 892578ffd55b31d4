"""`prepare` on a folder that mixes images (png, jpg, webp) and videos: one call, one index,
images as one-frame clips through the same latent encoder; a temporal patch pt > 1 gets a
still clip of pt latent frames."""
import json

import numpy as np
import torch
from PIL import Image

from vidscale.data.prepare import prepare
from vidscale.data.shapes import render
from vidscale.data.shards import ShardSource
from vidscale.data.video import decode_image, write_video
from vidscale.models.latent import PixelEncoder
from vidscale.scaling.config import load_config

from conftest import DEBUG


def test_a_mixed_folder_prepares_images_as_one_frame_latents(tmp_path):
    src = tmp_path / "media"
    (src / "stills").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = {}
    for name, (H, W) in [("stills/a.png", (32, 48)), ("stills/b.jpg", (48, 64)), ("c.webp", (40, 56))]:
        pixels[name] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(src / name, **({"lossless": True} if name.endswith("webp") else {}))
    (src / "stills" / "a.txt").write_text("a still of noise\n")
    write_video(src / "v.mp4", render("circle", "red", "blue", "right", 32, 48, 9, seed=0), fps=8)
    (src / "notes.md").write_text("not media")

    cfg = load_config(DEBUG, ["data.clip_frames=9"])
    index = prepare(src, tmp_path / "out", cfg.data, channels=cfg.model.in_channels, patch=cfg.model.patch,
                    progress=False)
    assert index["images"] == 3 and index["videos"] == 1 and index["failed"] == 0 and index["samples"] == 4
    shapes = {tuple(s) for sh in index["shards"] for s in sh["shapes"]}
    # the pixel encoder's 8x spatial and 4x temporal compression, sizes rounded to 16 px:
    # images are 1 latent frame, the 9-frame video 1 + 8/4 = 3
    assert shapes == {(1, 4, 6), (1, 6, 8), (1, 4, 8), (3, 4, 6)}
    assert json.loads((tmp_path / "out" / "index.json").read_text())["images"] == 3

    source = ShardSource(tmp_path / "out", seed=0, patch=cfg.model.patch, channels=4, text_dim=384)
    got = {m["source"]: (lat, m) for _, (lat, _, m), _ in source.stream(list(range(len(source))))}
    lat, meta = got["stills/a.png"]
    assert meta["image"] is True and meta["caption"] == "a still of noise" and meta["frame_range"] == [0, 1]
    assert meta["orig_size"] == [32, 48] and "image" not in got["v.mp4"][1]
    # the latent is the encoder's output for the picture as a one-frame clip (a lossless png)
    x = torch.from_numpy(pixels["stills/a.png"]).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    assert torch.equal(lat, PixelEncoder(4).encode(x)[0].to(torch.bfloat16))
    assert got["c.webp"][0].shape == (4, 1, 4, 8)  # 40x56 rounded to multiples of 16 (half to even): 32x64


def test_a_temporal_patch_above_one_gets_a_still_clip_of_pt_latent_frames(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "x.png")
    clip = decode_image(tmp_path / "x.png", multiple=16, temporal=4, pt=2)
    assert clip.image and clip.frames.shape == (5, 32, 32, 3)  # 1 + 4 frames: 2 latent frames
    lat = PixelEncoder(4).encode(torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    assert lat.shape[2] == 2 and torch.equal(lat[:, :, 0], lat[:, :, 1])
