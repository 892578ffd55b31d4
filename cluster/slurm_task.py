"""One rank of a Slurm job (`srun python -m vidscale.cluster.slurm_task`, started by RUN_DIR/job.sbatch).

Maps Slurm's task environment to the one torch.distributed expects (MASTER_ADDR and
MASTER_PORT come from the batch script), loads RUN_DIR/launch.yaml and calls `train(cfg)`.
A requeued job (SLURM_RESTART_COUNT > 0) resumes from the latest complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":
    # until train() installs its handler, USR1 (pre-emption) must not kill the rank: the stop
    # file the batch script also leaves behind carries the request. Ignore it before the
    # imports below, which take seconds (Slurm may signal a job right after it starts).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from vidscale.cluster.slurm import REQUEUE_MARKER  # noqa: E402
from vidscale.scaling.checkpoint.rundir import restart_resume  # noqa: E402
from vidscale.scaling.config import load_config  # noqa: E402
from vidscale.scaling.train import signals  # noqa: E402
from vidscale.scaling.train.loop import train  # noqa: E402


def torch_env(env: dict) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / NODE_RANK from SLURM_* variables."""
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if "SLURM_PROCID" not in env or not ntasks:
        raise ValueError("cluster.slurm_task runs under srun (SLURM_PROCID and SLURM_NTASKS are not set)")
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(int(ntasks) // int(env.get("SLURM_NNODES", "1")))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": ntasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node, "NODE_RANK": env.get("SLURM_NODEID", "0"),
            "GROUP_RANK": env.get("SLURM_NODEID", "0")}


def watch_stop_file(path: str, poll_s: float = 0.5) -> None:
    """Turn the batch script's stop file into a save request, from a thread: it reaches Ray
    workers (whose train function runs off the main thread, out of reach of signals) and a
    USR1 that arrived before `train()` installed its handler."""
    if not path:
        return

    def poll():
        while True:
            if os.path.exists(path):
                signals.request_save()
            time.sleep(poll_s)

    threading.Thread(target=poll, daemon=True, name="vidscale-stop-file").start()


def resume_after_requeue(cfg, env=None):
    """A requeued job (SLURM_RESTART_COUNT > 0) continues its run and never starts it over: the
    run dir's newest checkpoint when it holds one (see `rundir.restart_resume`)."""
    env = os.environ if env is None else env
    if int(env.get("SLURM_RESTART_COUNT", "0") or 0) <= 0:
        return cfg
    return replace(cfg, checkpoint=replace(cfg.checkpoint,
                                           resume=restart_resume(cfg.train.run_dir, cfg.checkpoint.resume)))


def main() -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as above, for callers of main()
    os.environ.update(torch_env(os.environ))
    # one line per rank in the job's log: where each rank ran (which node to look at when one dies)
    print(f"vidscale: rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} on node "
          f"{os.environ.get('SLURMD_NODENAME', '?')} (local rank {os.environ['LOCAL_RANK']}), "
          f"rendezvous {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}", flush=True)
    watch_stop_file(os.environ.get("VIDSCALE_STOP_FILE", ""))
    cfg = load_config(os.environ["VIDSCALE_CONFIG"])
    cfg = resume_after_requeue(cfg)
    result = train(cfg)
    if result.get("preempted") and os.environ["RANK"] == "0":
        # exit 0 (a non-zero rank would make srun kill the others): the marker asks for the requeue
        (Path(cfg.train.run_dir) / REQUEUE_MARKER).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
