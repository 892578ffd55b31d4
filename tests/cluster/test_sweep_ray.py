"""`vidscale sweep --launcher ray|slurm`: runs go concurrently on an embedded local Ray cluster,
or as Slurm jobs on a real single-node Slurm."""
import csv
import json

import pytest

from conftest import vidscale, write_two_run_sweep  # noqa: E402

pytestmark = pytest.mark.cluster


SLURM_TIME = {"cluster.slurm.time": "00:20:00"}
WSD = dict(hidden=(32,), budgets=("1e9", "3e9"), schedule="wsd-branches")


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory):
    """The validation losses of the same two runs run locally: what every launcher must give."""
    tmp = tmp_path_factory.mktemp("local-sweep")
    p = write_two_run_sweep(tmp, "local2", "local.yaml")
    r = vidscale("sweep", p, "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp / "out" / "results.csv", newline="") as f:
        return {x["name"]: float(x["loss"]) for x in csv.DictReader(f)}


def test_two_run_sweep_on_embedded_ray(tmp_path, local_losses):
    p = write_two_run_sweep(tmp_path, "ray2", "ray.yaml")
    r = vidscale("sweep", p, "--launcher", "ray", "--cpus", "2", "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [x["status"] for x in rows] == ["done", "done"]
    # both runs held the cluster at once (1 CPU each of 2): the second started before the first ended
    assert "running 2" in r.stdout
    for x in rows:
        job = json.loads((out / "runs" / x["name"] / "job.json").read_text())
        assert job["launcher"] == "ray" and job["state"] == "COMPLETED"
        assert float(x["loss"]) == pytest.approx(local_losses[x["name"]], rel=1e-6)  # same as run locally
    assert (out / "report.md").exists()


def test_two_run_sweep_on_slurm(tmp_path, slurm_cluster, local_losses):
    """--launcher slurm: one job array, a task per run, each task running the run's own script."""
    p = write_two_run_sweep(tmp_path, "slurm2", "slurm.yaml", set=SLURM_TIME)
    r = vidscale("sweep", p, "--launcher", "slurm", "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [x["status"] for x in rows] == ["done", "done"]
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    tasks = [state[x["name"]]["slurm_job"] for x in rows]
    array = tasks[0].split("_")[0]
    assert tasks == [f"{array}_0", f"{array}_1"]  # one array job
    assert "--array=0-1" in (tmp_path / "out" / "sweep.sbatch").read_text()
    for x in rows:
        assert (tmp_path / "out" / "runs" / x["name"] / "job.sbatch").exists()
        assert float(x["loss"]) == pytest.approx(local_losses[x["name"]], rel=1e-6)  # same as run locally
    # the same command again: nothing left to run
    r = vidscale("sweep", p, "--launcher", "slurm", timeout=300)
    assert r.returncode == 0 and "2 finished run(s) skipped; 0 to run" in r.stdout, r.stdout + r.stderr


def _losses(out):
    with open(out / "results.csv", newline="") as f:
        return {x["name"]: (x["status"], float(x["loss"])) for x in csv.DictReader(f)}


@pytest.fixture(scope="module")
def local_wsd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-wsd")
    p = write_two_run_sweep(tmp, "wsd-local", "wsd.yaml", **WSD)
    r = vidscale("sweep", p, "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _losses(tmp / "out")


@pytest.mark.parametrize("launcher", ["ray", "slurm"])
def test_wsd_branches_sweep_on_cluster_launchers(tmp_path, local_wsd, launcher, request):
    """The branch starts only once its trunk's checkpoint exists (Ray: while the trunk may still
    run; Slurm: a second job array after the trunks' array) and ends as it does locally."""
    extra = {}
    if launcher == "slurm":
        request.getfixturevalue("slurm_cluster")
        extra = SLURM_TIME
    p = write_two_run_sweep(tmp_path, f"wsd-{launcher}", "wsd.yaml", set=extra, **WSD)
    args = ["--cpus", "2"] if launcher == "ray" else []
    r = vidscale("sweep", p, "--launcher", launcher, "--progress-every", "5", *args, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(tmp_path / "out") == local_wsd  # same losses, bit for bit as printed
    plan = {x["name"]: x for x in json.loads((tmp_path / "out" / "plan.json").read_text())}
    assert plan["h32d1-C1e9"]["trunk"] == "h32d1-C3e9"
    if launcher == "slurm":
        assert r.stdout.count("submitted job array") == 2  # trunks, then the branches they made ready
