"""The whole CLI path on real video files written here with PyAV:
vidscale prepare -> vidscale train -> vidscale sample (text-to-video, image-to-video, SDEdit),
and a `task: vae` run used as the latent encoder of `vidscale prepare`."""
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vidscale.data.shapes import render
from vidscale.data.video import write_video
from vidscale.models.latent import PixelEncoder
from vidscale.scaling.inference.sample import read_video

from conftest import cli_env, vidscale  # noqa: E402

pytestmark = pytest.mark.e2e


def cli(*args, timeout=600):
    r = vidscale(*args, timeout=timeout, env=cli_env())
    assert r.returncode == 0, (args[0], r.stderr[-3000:])
    return r


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def make_videos(src: Path, n: int = 4) -> None:
    src.mkdir()
    for k in range(n):
        color, motion = ["red", "green", "yellow", "white"][k % 4], ["right", "left", "down", "up"][k % 4]
        write_video(src / f"v{k}.mp4", render("circle", color, "blue", motion, 32, 32, 9, seed=k), fps=8)
        (src / f"v{k}.txt").write_text(f"a {color} circle moving {motion}")


def test_prepare_train_sample_through_the_cli(tmp_path):
    src, shards, run = tmp_path / "videos", tmp_path / "shards", tmp_path / "run"
    make_videos(src)
    cli("prepare", src, shards, "--no-progress", "--set", "data.clip_frames=5")
    cli("train", "recipes/debug.yaml", "--run-dir", run, "--set", f"data.source={shards}", "--set", "train.steps=6",
        "--set", "train.tokens_per_batch=64", "--set", "objective.caption_dropout=0.2", "--set",
        "objective.cond_frames=1", "--set", "logging.progress=false", "--set", "checkpoint.every=0",
        "--set", "train.val_videos=0", "--set", "logging.sample_every=3", "--set", "parallel.zero_stage=0")
    assert (run / "model.safetensors").is_file() and (run / "ema.safetensors").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == [  # training samples, one prompt
        "step_0000003_0.mp4", "step_0000006_0.mp4"]

    # text-to-video with guidance: an mp4 of the requested size and length
    out = tmp_path / "t2v.mp4"
    r = cli("sample", run, "--prompt", "a red circle moving right", "--frames", 9, "--height", 32, "--width", 48,
            "--steps", 4, "--cfg-scale", 3, "--seed", 1, "--out", out)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["sampler"] == "flow" and read_frames(out).shape == (9, 32, 48, 3)
    # a gif and png frames
    cli("sample", run, "--prompt", "x", "--frames", 1, "--height", 16, "--width", 16, "--steps", 2,
        "--out", tmp_path / "img.png")
    assert (tmp_path / "img_0000.png").is_file() and not (tmp_path / "img_0001.png").exists()
    cli("sample", run, "--frames", 5, "--height", 16, "--width", 32, "--steps", 2, "--out", tmp_path / "a.gif")
    assert read_frames(tmp_path / "a.gif").shape[1:] == (16, 32, 3)

    # image-to-video: the first frame is the image, through the encoder's round trip
    img = render("square", "yellow", "black", "right", 32, 32, 1, seed=0)[0]
    Image.fromarray(img).save(tmp_path / "first.png")
    cli("sample", run, "--prompt", "a yellow square", "--frames", 5, "--height", 32, "--width", 32, "--steps", 3,
        "--first-frame", tmp_path / "first.png", "--out", tmp_path / "i2v.png")
    enc = PixelEncoder(4)
    x = torch.from_numpy(img).permute(2, 0, 1)[:, None][None].float() / 127.5 - 1
    want = ((enc.decode(enc.encode(x))[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(tmp_path / "i2v_0000.png"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    # --last-frame with --first-frame (interpolation): 9 frames are 3 latent frames, the middle one
    # generated; the video starts on the first image and its last latent frame (video frames 5-8)
    # holds the last image
    end = render("circle", "white", "black", "left", 32, 32, 1, seed=1)[0]
    Image.fromarray(end).save(tmp_path / "last.png")
    cli("sample", run, "--prompt", "a yellow square", "--frames", 9, "--height", 32, "--width", 32, "--steps", 3,
        "--first-frame", tmp_path / "first.png", "--last-frame", tmp_path / "last.png", "--out", tmp_path / "ab.png")
    y = torch.from_numpy(end).permute(2, 0, 1)[:, None][None].float() / 127.5 - 1
    want_end = ((enc.decode(enc.encode(y))[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    for t, w in ((0, want), (5, want_end), (8, want_end)):
        got = np.asarray(Image.open(tmp_path / f"ab_{t:04d}.png")).astype(int)
        assert np.abs(got - w.astype(int)).max() <= 1, t
    assert np.abs(np.asarray(Image.open(tmp_path / "ab_0003.png")).astype(int) - want_end.astype(int)).max() > 1

    # SDEdit at strength 0 returns the input video (through the latent encoder's round trip)
    cli("sample", run, "--prompt", "anything", "--frames", 5, "--height", 32, "--width", 32, "--steps", 4,
        "--init-video", src / "v0.mp4", "--strength", 0, "--out", tmp_path / "edit.png")
    v = read_video(src / "v0.mp4", 5, 32, 32)
    rt = ((enc.decode(enc.encode(v[None]))[0, :, :5].clamp(-1, 1) + 1) * 127.5).round().byte()
    for t in range(5):
        got = np.asarray(Image.open(tmp_path / f"edit_{t:04d}.png")).astype(int)
        assert np.abs(got - rt[:, t].permute(1, 2, 0).numpy().astype(int)).max() <= 1

    # the same from an exported file
    cli("export", run, "--out", tmp_path / "w.safetensors")
    cli("sample", tmp_path / "w.safetensors", "--prompt", "p", "--frames", 1, "--height", 16, "--width", 16,
        "--steps", 2, "--out", tmp_path / "e.png")

    # one-line errors
    r = vidscale("sample", run, "--frames", "4", "--out", tmp_path / "x.mp4", timeout=300)
    assert r.returncode == 2 and "--frames 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_vae_run_is_a_latent_encoder_for_prepare(tmp_path):
    """Pixel shards (data.encoder=raw) -> `task: vae` training with held-out PSNR -> prepare
    latents with data.encoder=vae:RUN_DIR."""
    src, pixels, run, lat = tmp_path / "videos", tmp_path / "pixels", tmp_path / "vae", tmp_path / "latents"
    make_videos(src, n=6)
    cli("prepare", src, pixels, "--no-progress", "--set", "data.encoder=raw", "--set", "data.clip_frames=9",
        "--set", "model.in_channels=3", "--set", "model.patch=[1,1,1]")
    index = json.loads((pixels / "index.json").read_text())
    assert index["encoder"] == "raw" and index["channels"] == 3 and index["samples"] == 6
    cli("train", "recipes/vae-debug.yaml", "--run-dir", run, "--set", f"data.source={pixels}", "--set",
        "train.steps=8", "--set", "train.val_every=4", "--set", "vae.val_clips=2", "--set", "logging.progress=false")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_psnr" in r] == [4, 8]
    cli("prepare", src, lat, "--no-progress", "--set", f"data.encoder=vae:{run}", "--set", "data.clip_frames=9")
    index = json.loads((lat / "index.json").read_text())
    assert index["channels"] == 4 and index["shards"][0]["shapes"][0] == [3, 4, 4]
