"""The resumable distributed loader over real webdataset shards: exactly-once epochs over
dp ranks, exact resume (with and without worker processes), remapping to a new dp size,
corrupt shards and samples skipped and counted (or failing by data.on_error)."""
import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
import torch

from vidscale.data.loader import remap_loader_states
from vidscale.scaling.config import load_config
from vidscale.scaling.train.metrics import ConsumedLog

from conftest import QUIET, ROOT, loader_for, truncate, write_shards


def cfg_for(src: Path, *over: str):
    return load_config(ROOT / "recipes/debug.yaml", [f"data.source={src}", "train.tokens_per_batch=64",
                                                     "data.lookahead=8", *over])


def epoch_batches(loader) -> list:
    """Exactly the batches of the loader's current segment (its plan says how many)."""
    return [next(loader) for _ in range(len(loader.plan()[1]) - loader.batch)]


def captions(batch) -> list[str]:
    return list(batch[1].names)


def test_two_dp_ranks_see_every_sample_exactly_once_per_epoch(tmp_path):
    src = write_shards(tmp_path / "s", n=41)  # odd: the ranks get 20 and 21 samples
    cfg = cfg_for(src)
    for epoch in range(2):
        seen = []
        loaders = [loader_for(cfg, r, 2) for r in range(2)]
        for ld in loaders:
            ld.epoch = epoch
            for tokens, meta in epoch_batches(ld):
                assert meta.num_real <= 64 and tokens.shape[0] == meta.seq_len
                seen += meta.names
        assert len(seen) == 41 and len(set(seen)) == 41, epoch
    # the two epochs visit shards in different orders
    a, b = loader_for(cfg, 0, 2), loader_for(cfg, 0, 2)
    b.epoch = 1
    assert [m.names for _, m in epoch_batches(a)] != [m.names for _, m in epoch_batches(b)]


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_loader_yields_exactly_the_rest(tmp_path, workers):
    src = write_shards(tmp_path / "s", n=30)
    cfg = cfg_for(src, f"data.workers={workers}")
    ref = loader_for(cfg, 1, 2, multiple=2)
    want = [next(ref) for _ in range(14)]  # crosses into the next epoch
    assert ref.epoch >= 1
    ld = loader_for(cfg, 1, 2, multiple=2)
    for _ in range(5):
        next(ld)
    sd = json.loads(json.dumps(ld.state_dict()))  # what a checkpoint stores
    back = loader_for(cfg_for(src, f"data.workers={2 - workers}"), 1, 2, multiple=2)  # any worker count
    back.load_state_dict(sd)
    for k in range(5, 14):
        tokens, meta = next(back)
        assert meta.names == want[k][1].names, k
        assert torch.equal(tokens, want[k][0]) and meta.seq_len % 2 == 0
        assert torch.equal(meta.text, want[k][1].text) and torch.equal(meta.coords, want[k][1].coords)
    with pytest.raises(ValueError, match="dp_size"):
        loader_for(cfg, 0, 3).load_state_dict(sd)
    other = write_shards(tmp_path / "other", n=30, seed=1)  # as many samples, different data
    with pytest.raises(ValueError, match="source"):
        loader_for(cfg_for(other), 1, 2, multiple=2).load_state_dict(sd)


@pytest.mark.parametrize("over", [["train.tokens_per_batch=128"], ["data.lookahead=2"], ["data.shuffle_buffer=1"]])
def test_resuming_with_other_packing_settings_finishes_the_epoch_exactly_once(tmp_path, over):
    """A resume may change how batches are packed (`--set train.tokens_per_batch=...`): the
    rest of the epoch is packed anew from what the checkpoint says was consumed, so every
    sample of the epoch is still trained exactly once."""
    src = write_shards(tmp_path / "s", n=40)
    cfg = cfg_for(src)
    ld = loader_for(cfg)
    taken = [n for _ in range(3) for n in next(ld)[1].names]
    sd = json.loads(json.dumps(ld.state_dict()))
    back = loader_for(cfg_for(src, *over))
    back.load_state_dict(sd)
    rest = [n for _, meta in epoch_batches(back) for n in meta.names]
    assert back.epoch == 0 and len(taken) + len(rest) == 40 and len(set(taken + rest)) == 40
    assert not set(taken) & set(rest)
    next(back)  # then the next epoch, by the new settings' own plan
    assert back.epoch == 1 and back.ranges is None


@pytest.mark.parametrize("new_dp", [1, 3])
def test_remap_to_a_new_dp_size_loses_and_repeats_nothing(tmp_path, new_dp):
    src = write_shards(tmp_path / "s", n=37)
    cfg = cfg_for(src)
    old = [loader_for(cfg, r, 2) for r in range(2)]
    consumed: dict[int, list] = {0: [], 1: []}
    for r, steps in ((0, 3), (1, 6)):  # rank 1 runs into its next epoch
        for _ in range(steps):
            names = next(old[r])[1].names
            consumed[old[r].epoch] += names  # the epoch of the batch just returned
    assert old[1].epoch == 1 and old[0].epoch == 0  # the ranks are in different epochs
    states = remap_loader_states([json.loads(json.dumps(ld.state_dict())) for ld in old], new_dp)
    new = [loader_for(cfg, r, new_dp) for r in range(new_dp)]
    rest: dict[int, list] = {0: [], 1: [], 2: []}
    for ld, sd in zip(new, states):
        ld.load_state_dict(sd)
        while True:
            names = next(ld)[1].names
            if ld.epoch > 1:
                break
            rest[ld.epoch] += names
    for e in (0, 1):
        allv = consumed[e] + rest[e]
        assert sorted(allv) == sorted(set(allv)) and len(allv) == 37, (e, len(allv))


def _consume_across_remap(cfg, steps: list[int], new_dp: int) -> tuple[dict, int, list[dict], list[str]]:
    """Old rank r takes steps[r] batches, the states go through a checkpoint's JSON and
    `remap_loader_states`, then every new rank takes batches until it has left the latest epoch
    any old rank reached. Returns what the ranks consumed ({epoch: [names]}, as the loaders
    reported them through on_batch), that epoch, the remapped states and every sample's name."""
    seen: dict[int, list[str]] = {}
    record = lambda epoch, names: seen.setdefault(epoch, []).extend(names)  # noqa: E731
    old = [loader_for(cfg, r, len(steps), on_batch=record) for r in range(len(steps))]
    for ld, k in zip(old, steps):
        for _ in range(k):
            next(ld)
    states = remap_loader_states([json.loads(json.dumps(ld.state_dict())) for ld in old], new_dp)
    last = max(max([s["epoch"]] + [q["epoch"] for q in s["queue"]]) for s in states)
    for r, sd in enumerate(states):
        epochs: list[int] = []

        def record_new(epoch, names, epochs=epochs):
            epochs.append(epoch)
            if epoch <= last:  # epoch last + 1 on: the new ranks' default blocks
                record(epoch, names)

        ld = loader_for(cfg, r, new_dp, on_batch=record_new)
        ld.load_state_dict(sd)
        while not epochs or epochs[-1] <= last:
            next(ld)
    return seen, last, states, [old[0].source.name(i) for i in range(old[0].n)]


def _idle_in_latest_epoch(states: list[dict], last: int) -> bool:
    """Some new rank has samples of an earlier epoch but none of the latest (the issue's case)."""
    for s in states:
        segs = [(s["epoch"], s["ranges"])] + [(q["epoch"], q["ranges"]) for q in s["queue"]]
        if any(r for e, r in segs if e < last) and not any(r for e, r in segs if e == last):
            return True
    return False


@pytest.mark.parametrize("n", [5, 8, 13])
def test_remap_property_every_sample_of_an_unfinished_epoch_is_consumed_exactly_once(tmp_path, n):
    """Over many (old dp, new dp, interruption steps of each old rank), also new dp x old dp >
    samples and new dp > the samples left of the latest epoch: from the keys the real loaders
    consumed, every epoch up to the latest one reached before the remap holds every sample
    exactly once (no consumed sample repeated, none left out)."""
    src = write_shards(tmp_path / "s", n=n, max_bytes=3000)
    cfg = cfg_for(src, "train.tokens_per_batch=40")  # 1-3 samples a batch: ranks drift apart
    # equal steps on every rank (a training run) and unequal ones (states of any progress)
    progress = ([(k,) for k in range(5)] + list(itertools.product(range(4), repeat=2))
                + list(itertools.product((0, 1, 3), repeat=3)))
    idle = crowded = cases = 0
    for steps in progress:
        for new_dp in sorted({1, 2, 3, 5, 7, n} - set(range(n + 1, 8))):
            seen, last, states, every = _consume_across_remap(cfg, list(steps), new_dp)
            for e in range(last + 1):
                assert sorted(seen.get(e, [])) == sorted(every), (steps, new_dp, e, last)
            idle += _idle_in_latest_epoch(states, last)
            crowded += len(steps) * new_dp > n
            cases += 1
    assert idle and crowded and cases >= 150, (idle, crowded, cases)  # the issue's case and dp x dp > n


def test_remap_the_issue_case_3_ranks_to_5_over_8_samples(tmp_path):
    """The issue's case: old ranks straddle an epoch boundary and some new rank gets nothing
    of the latest epoch; it used to roll into its default block of that epoch (a repeat)."""
    src = write_shards(tmp_path / "s", n=8, max_bytes=3000, seed=2)
    cfg = cfg_for(src, "train.tokens_per_batch=40")
    idle = 0
    for k in range(5):
        seen, last, states, every = _consume_across_remap(cfg, [k, 3, 3], 5)
        for e in range(last + 1):
            assert sorted(seen.get(e, [])) == sorted(every), (k, e, last)
        idle += _idle_in_latest_epoch(states, last)
    assert idle >= 3


@pytest.mark.parametrize("workers", [0, 2])
def test_on_batch_reports_exactly_the_batches_taken(tmp_path, workers):
    """Batches that workers prefetched but the training process never took are not reported."""
    src = write_shards(tmp_path / "s", n=30)
    got: list = []
    ld = loader_for(cfg_for(src, f"data.workers={workers}"), 0, 1, on_batch=lambda e, names: got.append((e, names)))
    taken = [(ld.epoch, next(ld)[1].names) for _ in range(3)]
    assert got == taken


def test_consumed_log_writes_per_step_and_epoch_and_drops_records_past_a_resume(tmp_path):
    logs = [ConsumedLog(tmp_path, r) for r in range(3)]
    for step in (1, 2, 3):
        for r, lg in enumerate(logs):
            lg.on_batch(step, [f"{r}.{step}a"])
            lg.on_batch(step, [f"{r}.{step}b"])
            lg.on_batch(step + 1, [f"{r}.{step}c"])  # the step crosses into the next epoch
            lg.write(step)
    first = json.loads((tmp_path / "consumed/dp00001.jsonl").read_text().splitlines()[0])
    assert first == {"step": 1, "epoch": 1, "keys": ["1.1a", "1.1b"]}
    for r in range(2):  # resumed from step 2 on 2 ranks: rank 0 also cuts the old rank 2's file
        ConsumedLog(tmp_path, r).truncate(2, dp=2)
    steps = {p.name: [json.loads(x)["step"] for x in p.read_text().splitlines()]
             for p in (tmp_path / "consumed").glob("dp*.jsonl")}
    assert steps == {f"dp0000{r}.jsonl": [1, 1, 2, 2] for r in range(3)}


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(tmp_path):
    src = write_shards(tmp_path / "s", n=30)
    index = json.loads((src / "index.json").read_text())
    assert len(index["shards"]) >= 3
    lost = index["shards"][1]["samples"]
    truncate(src / index["shards"][1]["name"], 0.3)  # cut inside the shard
    # overwrite one sample's tensor bytes in another shard with garbage of the same length
    name = index["shards"][2]["name"]
    with tarfile.open(src / name) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(src / name, "w") as t:
        for k, (m, data) in enumerate(members):
            if m.name.endswith(".safetensors") and k < 3:
                data = b"\xff" * len(data)
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    cfg = cfg_for(src)
    ld = loader_for(cfg, 0, 1)
    names = [n for _, m in epoch_batches(ld) for n in m.names]
    assert len(set(names)) == len(names)
    assert ld.stats["skipped"] == 30 - len(names)
    assert ld.stats["skipped"] >= 2  # the corrupt sample and at least one sample lost to the cut
    assert f"{name}:{index['shards'][2]['keys'][0]}" not in names  # the corrupt one
    assert len(names) >= 30 - lost - 1
    next(ld)  # the next epoch goes on
    with pytest.raises(ValueError, match="on_error=fail"):
        fail = loader_for(cfg_for(src, "data.on_error=fail"), 0, 1)
        for _ in range(40):
            next(fail)


def test_a_sample_missing_from_its_tar_is_named_itself(tmp_path):
    from vidscale.data.shards import ShardSource
    src = write_shards(tmp_path / "s", n=6, max_bytes=1 << 20)  # one shard
    index = json.loads((src / "index.json").read_text())
    name, keys = index["shards"][0]["name"], index["shards"][0]["keys"]
    with tarfile.open(src / name) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if not m.name.startswith(keys[1] + ".")]
    with tarfile.open(src / name, "w") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data))
    got = list(ShardSource(src, seed=0, patch=(1, 2, 2)).stream(list(range(6))))
    assert [i for i, s, _ in got if s is None] == [1]
    assert got[1][2] == f"{name}:{keys[1]}: missing from the tar"


def test_token_dropping_and_too_long_videos(tmp_path):
    src = write_shards(tmp_path / "s", n=12)
    cfg = cfg_for(src, "data.drop_tokens=0.5", "data.drop_min_tokens=8")
    ld = loader_for(cfg, 0, 1)
    for tokens, meta in epoch_batches(ld):
        for i in range(meta.num_videos):
            T, H, W = meta.grid[i]
            full = T * H * W
            n = meta.bounds[i + 1] - meta.bounds[i]
            assert n == (full if full < 8 else full - full // 2)
    with pytest.raises(ValueError, match="tokens_per_batch=4"):
        next(loader_for(cfg_for(src, "train.tokens_per_batch=4"), 0, 1))


def test_training_on_shards_with_workers_resumes_bit_for_bit(tmp_path):
    """The trainer's checkpoint holds the loader state: a run resumed at step 3 continues with
    exactly the losses of the uninterrupted run (same batches from the shards)."""
    from vidscale.scaling.train.metrics import read_metrics
    from vidscale.scaling.train.loop import train
    src = write_shards(tmp_path / "s", n=40)
    common = ["parallel.zero_stage=0", "data.workers=2", "train.steps=6", "checkpoint.every=3", "logging.every=1",
              *QUIET, "train.val_videos=1"]
    train(cfg_for(src, f"train.run_dir={tmp_path / 'a'}", *common))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert ckpt.is_dir()
    train(cfg_for(src, f"train.run_dir={tmp_path / 'b'}", f"checkpoint.resume={ckpt}", *common))
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b")}
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b), (a, b)
