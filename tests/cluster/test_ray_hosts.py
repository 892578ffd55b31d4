"""Ray across hosts of the network-namespace test bed (cluster/ray_hosts.py): one 2-host cluster,
head in h1 and a worker node in h2 (2 CPUs each), shared by the tests of this module.

- a 4-rank run driven from h1 places 2 ranks on each host, sends its traffic over eth0, and
  trains exactly the losses of the same layout run locally;
- `cluster.placement: STRICT_SPREAD` puts the 2 ranks of a 2-rank run on two hosts;
- elastic: h2 dies mid-run, the run goes on at world 2 from its latest checkpoint, h2 comes
  back, the run grows back to 4 and finishes; judged from what the ranks consumed;
- a host that does not share the run directory is named in one line before anything is written.
"""
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from vidscale.cluster import ray_hosts
from vidscale.scaling.checkpoint import storage

from conftest import ROOT, QUIET, host_bed, read_losses, set_args, vidscale, vidscale_cmd, wait_for

pytestmark = pytest.mark.cluster

PORT = 6390


class Cluster:
    """The bed, its Ray head (h1) and the worker node of h2 (replaceable)."""

    def __init__(self, bed, dir: Path):
        self.bed, self.dir = bed, dir
        self.head = self.node = None
        self.head = ray_hosts.start_head(bed.address("h1"), PORT, dir, num_cpus=2, prefix=bed.enter("h1"),
                                         env=ray_hosts.FAST_FAILOVER)
        self.join_h2()

    def join_h2(self, prefix_after: list[str] | None = None) -> None:
        """(Re)start h2's node; `prefix_after` runs between nsenter and ray (e.g. unshare)."""
        self.node = ray_hosts.join(self.head, self.bed.address("h2"), num_cpus=2,
                                   prefix=self.bed.enter("h2") + (prefix_after or []))

    def stop_h2(self) -> None:
        ray_hosts.stop(self.node)
        wait_for(lambda: self.alive_nodes() == 1, 60, "h2's node to leave the cluster")

    def alive_nodes(self) -> int:
        r = self.bed.run("h1", [os.sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], "
                                "logging_level='ERROR'); print(sum(1 for x in ray.nodes() if x['Alive']))",
                                self.head.gcs_address], capture_output=True, text=True, env=self.env(), timeout=60)
        return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else -1

    def env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", **self.head.client_env()}

    def train(self, run: Path, nproc: int, overrides: list[str]) -> list[str]:
        """The driver's command line, run on h1."""
        return [*self.bed.enter("h1"), *vidscale_cmd("train", "recipes/debug.yaml", "--launcher", "ray", "--address",
                                                     self.head.gcs_address, "--nproc", nproc, "--run-dir", run,
                                                     *set_args(["cluster.network_interface=eth0", *overrides]))]

    def close(self) -> None:
        for n in (self.node, self.head):
            if n is not None:
                ray_hosts.stop(n)


@pytest.fixture(scope="module")
def ray2(tmp_path_factory):
    bed = host_bed(2)
    dir = Path(f"/tmp/vsrh-{os.getpid()}")  # short: Ray's socket paths live under it
    try:
        c = Cluster(bed, dir)
    except BaseException as e:
        bed.down()  # every process of both hosts, the half-started cluster included
        subprocess.run(["rm", "-rf", str(dir)])
        if not isinstance(e, Exception):
            raise
        pytest.fail(f"could not start Ray on the 2-host bed: {e}")
    try:
        yield c
    finally:
        bed.down()  # kills every process of both hosts at once (a clean stop of each takes ~15 s)
        c.close()  # reaps them
        subprocess.run(["rm", "-rf", str(dir)])


LAYOUT = [*QUIET, "parallel.zero_stage=3", "parallel.ulysses=2", "train.steps=3", "logging.every=1",
          "checkpoint.every=0"]


def test_ranks_on_two_hosts_train_the_local_losses_over_eth0(ray2, tmp_path):
    local = tmp_path / "local"
    r = vidscale("train", "recipes/debug.yaml", "--nproc", 4, "--run-dir", local, *set_args(LAYOUT),
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ray"
    before = ray2.bed.tx_bytes()
    r = subprocess.run(ray2.train(run, 4, LAYOUT), cwd=ROOT, capture_output=True, text=True, env=ray2.env(),
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    sent = {h: n - before[h] for h, n in ray2.bed.tx_bytes().items()}
    assert read_losses(run) == read_losses(local)  # bit for bit: same world, same layout
    starts = [json.loads(line) for line in (run / "hosts.jsonl").read_text().splitlines()]
    assert len(starts) == 1 and starts[0]["world"] == 4
    addrs = Counter(h.split("(")[-1].rstrip(")") for h in starts[0]["hosts"])
    assert addrs == {ray2.bed.address("h1"): 2, ray2.bed.address("h2"): 2}, starts
    # ZeRO-3 gathers every parameter each step from both hosts: far more than Ray's own chatter
    params = (local / "model.safetensors").stat().st_size
    assert min(sent.values()) > 3 * params, (sent, params)


def test_strict_spread_puts_each_rank_on_its_own_host(ray2, tmp_path):
    """`cluster.placement` reaches Ray Train: STRICT_SPREAD places the 2 ranks of `--nproc 2` on
    two hosts (the default PACK fills one host of 2 CPUs first). Loss parity across hosts is the
    test above; this one is about placement only (3 steps)."""
    run = tmp_path / "spread"
    r = subprocess.run(ray2.train(run, 2, [*LAYOUT, "cluster.placement=STRICT_SPREAD"]), cwd=ROOT,
                       capture_output=True, text=True, env=ray2.env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    starts = [json.loads(line) for line in (run / "hosts.jsonl").read_text().splitlines()]
    addrs = sorted(h.split("(")[-1].rstrip(")") for h in starts[0]["hosts"])
    assert len(starts) == 1 and addrs == sorted([ray2.bed.address("h1"), ray2.bed.address("h2")]), starts
    assert sorted(read_losses(run)) == [1, 2, 3]


def _consumed(run: Path) -> dict[int, list[dict]]:
    return {int(p.stem[2:]): [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            for p in sorted((run / "consumed").glob("dp*.jsonl"))}


def test_elastic_run_loses_a_host_goes_on_at_world_2_and_grows_back(ray2, tmp_path):
    run = tmp_path / "elastic"
    videos, steps = 24, 400
    # Ray's coordinator sees a returning node at its next 20 s refresh, and the grow comes
    # ~35-60 s after the rejoin: the run must still be going by then. World 2 trains 2 steps/s
    # on a loaded machine and ~5 on a quiet one (where 120 steps ended before the grow)
    over = [*QUIET, "parallel.zero_stage=3", f"train.steps={steps}", "logging.every=1", "checkpoint.every=4",
            "data.record_consumed=true", f"data.synthetic_videos={videos}", "cluster.elastic=true",
            "cluster.min_nproc=2", "cluster.resize_check_s=2", "cluster.max_failures=3"]
    log = open(tmp_path / "driver.log", "w")
    p = subprocess.Popen(ray2.train(run, 4, over), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ray2.env())

    def records():
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").exists() else []

    def starts():
        return [json.loads(x) for x in (run / "hosts.jsonl").read_text().splitlines()] \
            if (run / "hosts.jsonl").exists() else []
    try:
        wait_for(lambda: storage.committed(run / "checkpoints") and max(r["step"] for r in records()) >= 6, 300,
                 "a checkpoint and step 6")
        ray2.bed.kill("h2")  # the node loses power: raylet, workers, everything
        ray2.node.proc.wait(10)
        wait_for(lambda: [s for s in starts() if s["world"] == 2], 300, "the worker group restarted at world 2")
        ray2.join_h2()  # the node comes back
        assert p.wait(900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    changes = [r for r in records() if "new_world" in r]
    assert [(r["old_world"], r["new_world"]) for r in changes] == [(4, 2), (2, 4)], changes
    # the first step after a checkpoint (every 4 steps), logged with the time the change cost
    assert all(r["seconds_lost"] > 0 and r["step"] % 4 == 1 and "loss" in r for r in changes), changes
    assert sorted(read_losses(run)) == list(range(1, steps + 1))
    assert [s["world"] for s in starts()] == [4, 2, 4]
    # what the ranks trained on: the records of redone steps were replaced on resume
    consumed = _consumed(run)
    assert sorted(consumed) == [0, 1, 2, 3]
    by_epoch: dict[int, list[str]] = {}
    trained = set()
    for recs in consumed.values():
        for x in recs:
            by_epoch.setdefault(x["epoch"], []).extend(x["keys"])
            trained.add(x["step"])
    assert trained == set(range(1, steps + 1))
    # each dp rank reads its share of every epoch: an epoch is over once every rank has moved past it
    open_from = min(recs[-1]["epoch"] for recs in consumed.values())
    every = sorted(f"synthetic:{i}" for i in range(videos))
    for e, keys in by_epoch.items():
        assert len(keys) == len(set(keys)), (e, Counter(keys))  # never a sample twice in an epoch
        if e < open_from:
            assert sorted(keys) == every, (e, sorted(set(every) - set(keys)))  # nor one lost
    at_grow = max(x["epoch"] for recs in consumed.values() for x in recs if x["step"] < changes[1]["step"])
    assert at_grow < open_from  # the epochs open at both world changes were finished and checked
    final = run / "checkpoints" / storage.read_latest(run / "checkpoints")
    storage.verify(final)  # every file of the last save against its manifest (raises if damaged)
    assert json.loads((final / "state.json").read_text())["step"] == steps


def test_a_host_without_the_shared_run_dir_is_named_before_anything_is_written(ray2, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    run = shared / "run"
    ray2.stop_h2()
    # h2's node in a mount namespace of its own, where `shared` is an empty tmpfs
    ray2.join_h2(["unshare", "-m", "sh", "-c", f'mount --make-rprivate / && mount -t tmpfs tmpfs "{shared}" && '
                  'exec "$@"', "sh"])
    try:
        r = subprocess.run(ray2.train(run, 4, LAYOUT), cwd=ROOT, capture_output=True, text=True, env=ray2.env(),
                           timeout=600)
    finally:
        ray2.stop_h2()
        ray2.join_h2()
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "not shared" in x]
    assert len(lines) == 1 and lines[0].startswith("vidscale: "), r.stderr[-3000:]
    assert f"({ray2.bed.address('h2')})" in lines[0] and str(run) in lines[0], lines
    print(lines[0])
    # only what the driver wrote before the workers started (and Ray's own storage_path): no
    # config.yaml, metrics.jsonl, hosts.jsonl or checkpoints
    assert sorted(x.name for x in run.iterdir()) == [".lock", "job.json", "launch.yaml", "ray"]
