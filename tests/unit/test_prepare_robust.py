"""`vidscale prepare` when things go wrong: every video unreadable, a decode worker killed
(as by the OOM killer), a long video (decoded clip by clip), and a second prepare into the
same OUT that fails midway (the earlier set stays consistent)."""
import gc
import json
import os
import signal
import weakref

import numpy as np
import pytest

import vidscale.data.prepare as prepare_mod
from vidscale.data.prepare import prepare
from vidscale.data.shapes import render
from vidscale.data.shards import ShardSource, read_index
from vidscale.data.video import decode_clips, write_video
from vidscale.scaling.cli.main import main
from vidscale.scaling.config import load_config

from conftest import DEBUG  # noqa: E402

MODEL = dict(channels=4, patch=(1, 2, 2))


def data_cfg(*extra):
    return load_config(DEBUG, ["data.clip_frames=5", "data.max_clips=2", "data.shard_max_bytes=20000",
                               *extra]).data


def make_videos(src, n=4, T=10):
    src.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        write_video(src / f"v{k}.mp4", render(["circle", "square"][k % 2], "red", "blue", "right", 32, 32, T,
                                              seed=k), fps=8)
    return src


def test_nothing_prepared_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        (src / f"bad{k}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 300)
    with pytest.raises(ValueError, match="nothing prepared"):
        prepare(src, tmp_path / "out", data_cfg(), progress=False, **MODEL)
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob("*.tar*"))
    rc = main(["prepare", str(src), str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("vidscale prepare: error:") and "nothing prepared" in err[-1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_image_or_caption_skips_that_file_only(tmp_path, workers):
    """An empty .png and a video whose caption file is not UTF-8 are skipped and counted, with
    or without decode workers; the other videos are prepared."""
    src = make_videos(tmp_path / "src", n=3)
    (src / "empty.png").write_bytes(b"")
    (src / "v1.txt").write_bytes(b"caf\xff")
    index = prepare(src, tmp_path / "out", data_cfg(), progress=False, workers=workers, **MODEL)
    failed = {f["file"].rsplit("/", 1)[-1]: f["error"] for f in index["failed_files"]}
    assert index["failed"] == 2 and set(failed) == {"empty.png", "v1.mp4"}, failed
    assert "v1.txt is not UTF-8 text" in failed["v1.mp4"]
    source = ShardSource(tmp_path / "out", seed=0, patch=(1, 2, 2))
    assert {s[2]["source"] for _, s, _ in source.stream(list(range(len(source))))} == {"v0.mp4", "v2.mp4"}


def test_killed_decode_worker_is_reported_and_the_rest_go_on(tmp_path, monkeypatch):
    src = make_videos(tmp_path / "src", n=5)
    real = prepare_mod.decode_clips

    def killer(path, **kw):  # runs in the forked worker: what the OOM killer does to it
        if path.name == "v2.mp4":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, **kw)
    monkeypatch.setattr(prepare_mod, "decode_clips", killer)
    index = prepare(src, tmp_path / "out", data_cfg(), progress=False, workers=2, **MODEL)
    assert index["failed"] == 1 and index["failed_files"][0]["file"].endswith("v2.mp4")
    assert "died" in index["failed_files"][0]["error"]
    source = ShardSource(tmp_path / "out", seed=0, patch=(1, 2, 2))
    sources = {s[2]["source"] for _, s, _ in source.stream(list(range(len(source))))}
    assert sources == {"v0.mp4", "v1.mp4", "v3.mp4", "v4.mp4"}


def test_long_video_is_decoded_clip_by_clip(tmp_path, monkeypatch):
    # 12 clips: enough to see that none outlives its turn (each check is a gc.collect(), slow
    # in a process that has run the rest of the suite)
    frames = np.stack([np.full((16, 16, 3), 20 * t % 250, np.uint8) for t in range(60)])
    write_video(tmp_path / "long.mp4", frames, fps=8)
    # the decoder keeps no clip it has handed out
    alive = []
    for c in decode_clips(tmp_path / "long.mp4", 5, 16):
        alive.append(weakref.ref(c.frames))
        del c
        gc.collect()
        assert sum(r() is not None for r in alive) == 0
    assert len(alive) == 12
    # and prepare (in this process) encodes each clip before the next is decoded
    real, live, most = prepare_mod.decode_clips, [], [0]

    def watched(path, **kw):
        for c in real(path, **kw):
            gc.collect()
            most[0] = max(most[0], sum(r() is not None for r in live))
            live.append(weakref.ref(c.frames))
            yield c
    monkeypatch.setattr(prepare_mod, "decode_clips", watched)
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "long.mp4").rename(src / "long.mp4")
    index = prepare(src, tmp_path / "out", data_cfg("data.max_clips=0"), progress=False, **MODEL)
    assert index["samples"] == 12 and most[0] == 0, most


def test_interrupted_prepare_leaves_the_earlier_set_consistent(tmp_path, monkeypatch):
    src, out = make_videos(tmp_path / "src", n=6), tmp_path / "out"
    first = prepare(src, out, data_cfg(), progress=False, **MODEL)
    assert len(first["shards"]) >= 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    make_videos(tmp_path / "src", n=8, T=14)  # different videos: every shard would change
    real, seen = prepare_mod.decode_clips, []

    def fails_midway(path, **kw):
        seen.append(path.name)
        if len(seen) == 6:
            raise KeyboardInterrupt  # interrupted (Ctrl-C, or killed) after writing shards
        return real(path, **kw)
    monkeypatch.setattr(prepare_mod, "decode_clips", fails_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, data_cfg("data.shard_max_bytes=5000"), progress=False, **MODEL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary files left either
    index = read_index(out)
    assert index == json.loads(before["index.json"])
    source = ShardSource(out, seed=0, patch=(1, 2, 2), channels=4)
    got = [s for _, s, err in source.stream(list(range(len(source))))]
    assert len(got) == first["samples"] and all(s is not None for s in got)
    # a later prepare that completes replaces the set
    monkeypatch.setattr(prepare_mod, "decode_clips", real)
    again = prepare(src, out, data_cfg("data.shard_max_bytes=5000"), progress=False, **MODEL)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for s in again["shards"])
    assert not list(out.glob("*.tmp*"))
