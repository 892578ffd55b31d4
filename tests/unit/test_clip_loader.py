"""The VAE task's clip loader: one stream of shuffled epochs that the data-parallel ranks take
in turn, so no clip is dropped at an epoch's end, each is taken once per epoch, and a resume
(the checkpoint's loader part, through the same files a save writes) continues exactly where
the saved ranks stopped, on the same or another dp size."""
import json
from collections import Counter

import pytest

from vidscale.data.clips import ClipLoader
from vidscale.scaling.checkpoint.manager import LoaderPart
from vidscale.scaling.parallel.dims import ParallelDims

from conftest import load_config, ROOT  # noqa: E402

N = 13  # training clips: no dp size below divides it


def _loaders(dp: int) -> list[ClipLoader]:
    cfg = load_config(ROOT / "recipes/vae-debug.yaml", [f"data.synthetic_videos={N}", "vae.crop=[16,16]", "vae.frames=1"])
    return [ClipLoader(cfg.data, cfg.vae, cfg.train.seed, r, dp) for r in range(dp)]


def _rounds(loaders, n: int) -> list[tuple[int, int]]:
    """n micro-batches on every rank, in lockstep: (epoch, clip id) of each clip taken."""
    out = []
    for _ in range(n):
        for ld in loaders:
            _, meta = next(ld)
            out.append((ld.epoch, int(meta.names[0])))
    return out


def _save(loaders, path, dp: int) -> None:
    for r, ld in enumerate(loaders):
        part = LoaderPart(ld, ParallelDims(world=dp, rank=r))
        for rel, (kind, obj) in part.checkpoint_files(path, snapshot=False).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(json.dumps(obj))


def _restore(path, old_dp: int, dp: int) -> list[ClipLoader]:
    loaders = _loaders(dp)
    for r, ld in enumerate(loaders):
        LoaderPart(ld, ParallelDims(world=dp, rank=r)).load_checkpoint(path, {"dp": old_dp})
    return loaders


def _check_epochs(taken: list[tuple[int, int]]) -> None:
    by_epoch: dict[int, list[int]] = {}
    for e, i in taken:
        by_epoch.setdefault(e, []).append(i)
    last = max(by_epoch)
    for e, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), (e, Counter(ids))  # never a clip twice in an epoch
        if e < last:
            assert sorted(ids) == list(range(N)), (e, sorted(set(range(N)) - set(ids)))  # nor one dropped


def test_no_clip_is_dropped_at_an_epochs_end():
    taken = _rounds(_loaders(2), 20)  # 40 clips: three epochs of 13 and one clip of the fourth
    _check_epochs(taken)
    assert [e for e, _ in taken].count(3) == 1


@pytest.mark.parametrize("old_dp,new_dp", [(2, 2), (2, 3), (3, 1)])
def test_resume_continues_the_stream_exactly_once(tmp_path, old_dp, new_dp):
    loaders = _loaders(old_dp)
    before = _rounds(loaders, 7)  # the saved ranks are mid-epoch
    _save(loaders, tmp_path, old_dp)
    after = _rounds(_restore(tmp_path, old_dp, new_dp), 12)
    _check_epochs(before + after)
    if new_dp == old_dp:  # the same layout takes exactly what the uninterrupted run takes
        assert after == _rounds(_loaders(old_dp), 19)[len(before):]


def test_a_state_from_another_dataset_is_one_clear_error(tmp_path):
    loaders = _loaders(2)
    _rounds(loaders, 3)
    _save(loaders, tmp_path, 2)
    state = tmp_path / "loader/dp00000.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "n": N + 5}))
    with pytest.raises(ValueError, match=f"saved with {N + 5} training clips, this run has {N}"):
        _restore(tmp_path, 2, 2)
