"""What `vidscale prepare` reads: clips decoded from a real video file (frame rate, area,
clip count) and caption sidecars."""
import numpy as np
import pytest

from vidscale.data.prepare import caption_for, load_captions
from vidscale.data.video import decode_clips, write_video


def test_decode_resamples_frame_rate_and_limits_area(tmp_path):
    frames = np.stack([np.full((48, 80, 3), 5 * t, np.uint8) for t in range(33)])  # brightness = frame index
    write_video(tmp_path / "v.mp4", frames, fps=16)
    clips = list(decode_clips(tmp_path / "v.mp4", 9, 16, fps=8))
    assert [c.frames.shape for c in clips] == [(9, 48, 80, 3)] and clips[0].fps == 8
    means = clips[0].frames.reshape(9, -1).mean(1) / 5  # every other source frame
    assert np.allclose(means, np.arange(0, 18, 2), atol=1.0), means
    small = list(decode_clips(tmp_path / "v.mp4", 17, 16, max_area=32 * 64))
    assert len(small) == 1 and small[0].frames.shape[1:3] == (32, 64) and small[0].orig_size == (48, 80)
    assert [c.start for c in decode_clips(tmp_path / "v.mp4", 5, 16, max_clips=3)] == [0, 5, 10]


def test_caption_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    v1, v2, v3 = tmp_path / "sub" / "a.mp4", tmp_path / "b.webm", tmp_path / "c.gif"
    v2.with_suffix(".txt").write_text("from the txt\n")
    (tmp_path / "caps.csv").write_text('file,caption\nsub/a.mp4,"a, with comma"\nb.webm,from the csv\n')
    caps = load_captions(str(tmp_path / "caps.csv"), tmp_path)
    assert caption_for(v1, tmp_path, caps) == "a, with comma"
    assert caption_for(v2, tmp_path, caps) == "from the csv"  # the sidecar file wins over the .txt
    assert caption_for(v2, tmp_path, {}) == "from the txt" and caption_for(v3, tmp_path, caps) is None
    (tmp_path / "bad.jsonl").write_text('{"file": "a.mp4"}\n')
    with pytest.raises(ValueError, match="row 1 lacks 'file' or 'caption'"):
        load_captions(str(tmp_path / "bad.jsonl"), tmp_path)


def test_decoding_at_a_frame_rate_counts_from_the_first_frame(tmp_path):
    """A stream whose first frame is at 2 s (a cut from a longer file) resamples from that
    frame on: the clip holds the video's frames, not 2 s worth of copies of its first."""
    from fractions import Fraction

    import av

    from vidscale.data.video import rgb_to_yuv420p
    path = tmp_path / "late.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 80, 48, "yuv420p"
        s.options = {"qp": "0"}
        for t in range(33):
            f = av.VideoFrame.from_ndarray(rgb_to_yuv420p(np.full((48, 80, 3), 5 * t, np.uint8)), format="yuv420p")
            f.pts, f.time_base = 32 + t, Fraction(1, 16)  # frame 32 at 16 fps: it starts at 2 s
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    (first,) = decode_clips(path, 33, 16)
    assert first.frames.shape[0] == 33  # as written
    clips = list(decode_clips(path, 9, 16, fps=8))
    means = clips[0].frames.reshape(9, -1).mean(1) / 5
    assert np.allclose(means, np.arange(0, 18, 2), atol=1.0), means  # every other frame, from the first


def test_caption_files_that_are_not_text_are_named(tmp_path):
    v = tmp_path / "a.mp4"
    v.with_suffix(".txt").write_bytes(b"caf\xff\n")
    with pytest.raises(ValueError, match=r"caption .*a\.txt is not UTF-8 text \(byte 3"):
        caption_for(v, tmp_path, {})
    (tmp_path / "lone.jsonl").write_text('{"file": "a.mp4", "caption": "x \\ud800"}\n')
    with pytest.raises(ValueError, match=r"lone\.jsonl: row 1 holds a character that is not valid Unicode"):
        load_captions(str(tmp_path / "lone.jsonl"), tmp_path)
    (tmp_path / "short.csv").write_text("file,caption\na.mp4\n")  # a row without its caption cell
    with pytest.raises(ValueError, match=r"short\.csv: row 1 lacks 'file' or 'caption'"):
        load_captions(str(tmp_path / "short.csv"), tmp_path)
    (tmp_path / "latin1.csv").write_bytes(b"file,caption\na.mp4,caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8 text"):
        load_captions(str(tmp_path / "latin1.csv"), tmp_path)
