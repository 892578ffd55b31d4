"""The Ray launcher: one Ray Train worker per rank, each calling the same `train(cfg)`.

    launch_ray(cfg)                      TorchTrainer on `cluster.address` / RAY_ADDRESS, or on
                                         an embedded local cluster (127.0.0.1) started and
                                         stopped here when there is no address
    launch_ray(cfg, detach=True)         a Ray job (JobSubmissionClient) whose entrypoint is
                                         `python -m vidscale.cluster.ray_launcher RUN_DIR/launch.yaml`

Ray Train's TorchTrainer creates the process group (gloo on CPU, nccl on GPU) and sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `train(cfg)` reuses it.
Fault tolerance: FailureConfig(max_failures=cluster.max_failures) replaces every worker
when one dies, and the new workers resume from vidscale's own latest complete checkpoint
(`checkpoint.resume=auto`), not from whatever Ray last registered. Metrics stay in the
run's metrics.jsonl: nothing is reported to Ray (each report is a barrier).

Elastic (`cluster.elastic`): ScalingConfig(num_workers=(cluster.min_nproc, cluster.nproc),
elastic_resize_monitor_interval_s=cluster.resize_check_s). Ray Train starts the group at the
size the cluster can hold; a lost node is a worker-group failure (it counts against
max_failures) after which the group restarts at the size that is left; resources coming back
make it shut the group down and start a bigger one (not a failure). Every restart, of either
kind, resumes from the latest complete checkpoint at the new world size (universal
checkpoint, loader state remapped), and each world change is logged to metrics.jsonl.
Across hosts the run dir must be shared: every rank checks that it sees the driver's lock
before anything is read or written there (`rundir.check_shared`); a host that does not is
named in one line and the driver exits 1. See cluster/ray_hosts.py to start the cluster.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":
    # Run by a Slurm batch script (Ray on Slurm) that forwards its pre-emption USR1 here: it
    # must not kill the driver (the workers see the stop file and checkpoint). Ignore it
    # before the imports below, which take seconds, rather than only once main() runs.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from vidscale.cluster.job import new_job  # noqa: E402
from vidscale.cluster.ray_cluster import (LOOPBACK_HOSTS, EmbeddedRay, init_keeping_handlers,  # noqa: E402
                                          split_address, use_token_auth)
from vidscale.cluster.slurm import REQUEUE_MARKER  # noqa: E402
from vidscale.cluster.slurm_task import resume_after_requeue, watch_stop_file  # noqa: E402
from vidscale.scaling.checkpoint.rundir import (LOCK_ENV, RunDirNotShared, check_shared, held_by_launcher,  # noqa: E402
                                                restart_resume)
from vidscale.scaling.config import (check_elastic, check_layout, load_config, network_env,  # noqa: E402
                                     save_config)
from vidscale.scaling.parallel import collectives  # noqa: E402
from vidscale.scaling.train.loop import train  # noqa: E402
from vidscale.scaling.train.signals import stop_on  # noqa: E402

CONFIG = "launch.yaml"
ATTEMPTS = ".ray_attempts"
"""Per-launch markers in the run dir: a worker group that finds its launch's marker is a restart."""
WORKER_ENV = {
    # the controller polls workers this often; Ray's default (2 s) makes every report and
    # every failure detection slow (measured, Ray 2.60: ray.train.report() blocked ~1.7 s
    # per call at the default, 3-7 ms at 0.2 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def address_of(cfg) -> str:
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")


def is_job_server(address: str) -> bool:
    """A dashboard URL takes jobs only: the run goes in as a Ray job."""
    return address.startswith(("http://", "https://"))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """One line when nothing listens at a Ray address (GCS `host:port`, `ray://host:port`, or a
    dashboard URL), before anything starts: Ray's own client retries a dead address without
    end (e.g. a finished sweep's embedded cluster, recorded in its runs' config.yaml)."""
    if not address or address == "auto":
        return
    host, port = split_address(address)
    if not host or port is None:
        raise ValueError(f"cluster.address {address!r}: expected host:port, ray://host:port, http://host:port "
                         "or auto")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"cluster.address {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                         "(`python -m vidscale.cluster.ray_cluster up`), give another --address, or none "
                         "(`--set cluster.address=''`) for a cluster of this command's own") from None


def check_request(cfg) -> None:
    """One-line errors for impossible worker requests, before Ray is touched."""
    c = cfg.cluster
    if c.cpus_per_worker <= 0:
        raise ValueError(f"cluster.cpus_per_worker = {c.cpus_per_worker}: expected a positive number")
    if c.gpus_per_worker < 0:
        raise ValueError(f"cluster.gpus_per_worker = {c.gpus_per_worker}: expected 0 or more")
    worker_config(cfg)  # train.device=cuda without GPUs per worker: refused before Ray starts
    if c.max_failures < -1:
        raise ValueError(f"cluster.max_failures = {c.max_failures}: expected -1 (no limit), 0 or more")
    check_layout(cfg, c.nproc, f"--nproc {c.nproc}")
    if c.elastic:
        check_elastic(cfg, c.nproc, f"--nproc {c.nproc}")


def check_resources(cfg) -> None:
    """The connected cluster must be able to hold every worker at once, or Ray Train would wait
    for resources forever."""
    import ray
    c = cfg.cluster
    total = ray.cluster_resources()
    n = c.min_nproc if c.elastic else c.nproc  # an elastic run starts with what there is
    need = {"CPU": n * c.cpus_per_worker, "GPU": n * c.gpus_per_worker}
    for res, amount in need.items():
        if amount > total.get(res, 0) + 1e-9:
            key = "cluster.cpus_per_worker" if res == "CPU" else "cluster.gpus_per_worker"
            raise ValueError(f"{n} workers x {key} = {getattr(c, key.split('.')[1])} need {amount:g} {res}s; "
                             f"the Ray cluster has {total.get(res, 0):g}")


# -- in the workers ------------------------------------------------------------------------------
def _is_restart(run_dir: Path, launch_id: str) -> bool:
    """Rank 0 decides (a marker per launch) and tells the others, so all ranks agree even if a
    worker died before it got this far in the previous attempt."""
    restart = False
    if int(os.environ.get("RANK", "0")) == 0:
        marker = run_dir / ATTEMPTS / launch_id
        restart = marker.exists()
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "a") as f:
            f.write(f"{time.time():.3f}\n")
    return bool(collectives.broadcast_json(restart, src=0))


def worker_config(cfg):
    """The recipe a worker trains: on the CPU when the worker was given no GPU.

    Ray (2.60) no longer hides a GPU host's GPUs from a worker that requested none: with
    `train.device: auto` such a worker would pick cuda and build nccl groups over the gloo
    group Ray created. A recipe that asks for cuda without GPUs per worker is an error."""
    if cfg.cluster.gpus_per_worker > 0:
        return cfg
    if cfg.train.device == "cuda":
        raise ValueError("train.device=cuda with cluster.gpus_per_worker=0: Ray gives the workers no GPU; "
                         "set cluster.gpus_per_worker (e.g. 1) or train.device=cpu")
    return replace(cfg, train=replace(cfg.train, device="cpu"))


def train_worker(config: dict) -> dict | None:
    """Ray Train's per-worker function: one rank of `train(cfg)`. Returns {"error": one line}
    on every rank when a rank does not see the run directory (Ray would retry an exception)."""
    if config.get("run_lock"):  # the driver owns the run dir: rank 0 runs under its lock
        os.environ[LOCK_ENV] = config["run_lock"]
        try:  # before anything here reads or writes the run dir (launch.yaml lives there)
            check_shared(config["run_dir"], config["run_lock"])
        except RunDirNotShared as e:
            return {"error": str(e)}
    cfg = worker_config(load_config(config["config_path"]))
    run_dir = Path(cfg.train.run_dir)
    if _is_restart(run_dir, config["launch_id"]):
        resume = restart_resume(run_dir, cfg.checkpoint.resume)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=resume))
        print(f"vidscale: worker group restarted; rank {os.environ.get('RANK')} resumes from "
              f"{'the latest complete checkpoint' if resume == 'auto' else resume}", flush=True)
    watch_stop_file(config.get("stop_file", ""))
    result = train(cfg)
    if result.get("preempted") and os.environ.get("RANK", "0") == "0":
        (run_dir / REQUEUE_MARKER).touch()
    return None


# -- the driver ------------------------------------------------------------------------------------
def write_config(cfg) -> Path:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG
    save_config(cfg, path)
    return path


def run_trainer(cfg, address: str = "", nodes: int = 1) -> int:
    """Run the training here as the Ray driver; returns 0 on success, 1 on failure."""
    use_token_auth(address)  # before ray is imported: it reads the mode once
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    check_request(cfg)
    path = write_config(cfg)
    run_dir = Path(cfg.train.run_dir)
    # a Ray job's entrypoint already has them (submit_job): the job's runtime env then may not
    # be given again, Ray refuses a second definition of the same variables
    # (the network variables too: Ray Train binds the process group's sockets before train_worker runs)
    want = {**WORKER_ENV, **network_env(c)}
    in_job = all(os.environ.get(k) == v for k, v in want.items())
    runtime_env = None if in_job else {"env_vars": want}
    if runtime_env and address and address != "auto":
        # Ray Train's helper actors look the cluster up by RAY_ADDRESS; without it they fail
        # ("multiple active Ray instances") wherever several clusters share a machine
        runtime_env["env_vars"]["RAY_ADDRESS"] = address
    os.environ.update(WORKER_ENV)  # the controller actor reads them too (local clusters)
    embedded = None
    if address:
        init_keeping_handlers(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=True)
    else:
        # an embedded single-node cluster, on 127.0.0.1 with a token, gone when this process ends
        embedded = EmbeddedRay(max(2, int(c.nproc * c.cpus_per_worker + 0.999)),
                               gpus=int(c.nproc * c.gpus_per_worker + 0.999), runtime_env=runtime_env)
        embedded.__enter__()
    try:
        check_resources(cfg)
        use_gpu = c.gpus_per_worker > 0
        backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
        per_worker = {"CPU": c.cpus_per_worker}
        if use_gpu:
            per_worker["GPU"] = c.gpus_per_worker
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config_path": str(path), "run_dir": str(run_dir.absolute()),
                               "launch_id": uuid.uuid4().hex,
                               "stop_file": os.environ.get("VIDSCALE_STOP_FILE", ""),
                               # the run dir's lock, when this driver holds it (cluster/launch.py)
                               # (an inherited token of a lock since released, e.g. the submitting
                               # shell's of a Slurm job, is not one: rank 0 then takes the lock)
                               "run_lock": os.environ.get(LOCK_ENV, "") if held_by_launcher(run_dir) else ""},
            torch_config=TorchConfig(backend=backend, timeout_s=cfg.parallel.timeout_s),
            scaling_config=ScalingConfig(
                num_workers=(c.min_nproc, c.nproc) if c.elastic else c.nproc, use_gpu=use_gpu,
                resources_per_worker=per_worker, placement_strategy=c.placement,
                elastic_resize_monitor_interval_s=c.resize_check_s),
            run_config=RunConfig(name=re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name), storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=c.max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError: out of retries, or a bad recipe in the workers
            print(f"vidscale: Ray training failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            return 1
        err = (getattr(result, "return_value", None) or {}).get("error")
        if err:  # rank 0's answer: a refusal every rank agreed on (no retry would change it)
            print(f"vidscale: {err}", file=sys.stderr)
            return 1
        return 0
    finally:
        if embedded is not None:
            embedded.__exit__(None, None, None)
        else:
            ray.shutdown()


def launch_ray(cfg, wait: bool = False, detach: bool = False, command: list[str] | None = None) -> int:
    check_request(cfg)
    address = address_of(cfg)
    check_reachable(address)
    if detach or is_job_server(address):
        return submit_job(cfg, address, wait=wait, command=command)
    job = new_job("ray", cfg.train.run_dir, command or sys.argv, state="RUNNING", address=address,
                  pid=os.getpid())
    job.save()
    # `vidscale cancel` sends SIGTERM, a closed terminal SIGHUP: leave through `finally`, so
    # ray.shutdown() runs (and an embedded cluster is stopped), then exit 143 / 129
    old = stop_on(signal.SIGTERM, signal.SIGHUP)
    code = 1
    try:
        code = run_trainer(cfg, address)
    except KeyboardInterrupt:
        job.set_state("CANCELLED")
        raise
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if job.state == "RUNNING":
            job.set_state("COMPLETED" if code == 0 else "FAILED")
    return code


# -- Ray jobs ---------------------------------------------------------------------------------------
def _client(address: str):
    use_token_auth(address)  # before ray is imported: it reads the mode once
    from ray.job_submission import JobSubmissionClient
    if not address:
        raise ValueError("a Ray job needs a running cluster: pass --address (or set RAY_ADDRESS) to its "
                         "dashboard, e.g. http://127.0.0.1:8265; start one with `python -m vidscale.cluster.ray_cluster up`")
    return JobSubmissionClient(address)


def _local(address: str) -> bool:
    return split_address(address)[0] in (*LOOPBACK_HOSTS, "", "auto")


def submit_job(cfg, address: str, wait: bool = False, command: list[str] | None = None) -> int:
    client = _client(address)
    path = write_config(cfg)
    # on this machine the job runs this interpreter; elsewhere, the cluster's `python`
    python = sys.executable if _local(address) else "python"
    entry = f"{shlex.quote(python)} -m vidscale.cluster.ray_launcher {shlex.quote(str(path))}"
    sub_id = f"vidscale-{re.sub(r'[^A-Za-z0-9_-]', '_', cfg.name)[:40]}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + 90
    while True:
        try:
            job_id = client.submit_job(entrypoint=entry, submission_id=sub_id,
                                       runtime_env={"env_vars": {**WORKER_ENV, **network_env(cfg.cluster)}},
                                       metadata={"run_dir": str(cfg.train.run_dir)})
            break
        except RuntimeError as e:  # a fresh head's job agent comes up after its dashboard
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    job = new_job("ray", cfg.train.run_dir, command or sys.argv, job_ids=[job_id], state="PENDING",
                  address=address)
    job.save()
    print(f"vidscale: submitted Ray job {job_id} to {address}; follow with `vidscale status {cfg.train.run_dir}`",
          flush=True)
    print(job_id, flush=True)
    if not wait:
        return 0
    return follow_job(job)


RAY_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_status(job) -> str:
    return str(_client(job.address).get_job_status(job.job_ids[-1]).value)


def follow_job(job, poll_s: float = 1.0, out=sys.stdout) -> int:
    """Print the job's log as it grows until it ends; 0 if it SUCCEEDED."""
    client = _client(job.address)
    job_id, shown = job.job_ids[-1], 0
    while True:
        state = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if state != job.state:
            job.set_state(state)
        if state in RAY_DONE:
            return 0 if state == "SUCCEEDED" else 1
        time.sleep(poll_s)


def cancel_job(job) -> bool:
    """Stop the Ray job; False (job.json then records how it ended) when it had already ended."""
    try:
        stopped = _client(job.address).stop_job(job.job_ids[-1])
    except RuntimeError as e:  # e.g. the job server does not know the job (another cluster now)
        raise ValueError(f"{job.run_dir}: Ray job {job.job_ids[-1]} at {job.address or 'auto'}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not stopped:
        job.set_state(job_status(job))
        return False
    job.set_state("STOPPED")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a Ray job (and of Ray on Slurm): run the trainer on the current cluster."""
    p = argparse.ArgumentParser(prog="python -m vidscale.cluster.ray_launcher")
    p.add_argument("config", help="RUN_DIR/launch.yaml")
    p.add_argument("--address", default="auto", help="Ray cluster to use (default: the one this job runs on)")
    p.add_argument("--nodes", type=int, default=1, help="wait until this many Ray nodes have joined")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    # Ray on Slurm: the batch script forwards its pre-emption USR1 here too; it must not kill
    # the driver (the workers see the stop file and checkpoint), and a requeued job resumes
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cfg = resume_after_requeue(cfg)
    if a.nodes > 1:
        _wait_for_nodes(a.address, a.nodes)
    return run_trainer(cfg, a.address)


def _wait_for_nodes(address: str, n: int, timeout_s: float = 300) -> None:
    use_token_auth(address)
    import ray
    ray.init(address=address, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout_s
        while sum(1 for x in ray.nodes() if x.get("Alive")) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(1 for x in ray.nodes() if x.get('Alive'))} of {n} Ray nodes joined")
            time.sleep(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
