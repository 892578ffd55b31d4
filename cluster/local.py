"""`vidscale train RECIPE --nproc N`: N training processes on this machine.

Each process gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs `python -m vidscale.scaling.train.loop`, which
reads the resolved recipe from VIDSCALE_CONFIG and calls the same `train(cfg)` as every
other launcher. Rank 0's output is shown; the other ranks write RUN_DIR/logs/rankR.log.
If one rank fails, the others are stopped at once and the launcher exits with the
failing rank's exit code after printing the end of its log.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from vidscale.scaling.config import check_layout, save_config
from vidscale.scaling.train.loop import default_run_dir
from vidscale.scaling.train.signals import EXIT_REQUEUE


def free_port() -> int:
    """A TCP port that is free now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Workers get SIGTERM if the launcher dies (Linux), so no rank outlives it."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(cfg) -> int:
    """Start `cluster.nproc` ranks of `train(cfg)` here; return 0 or the failing rank's code."""
    nproc = cfg.cluster.nproc
    check_layout(cfg, nproc, f"--nproc {nproc}")
    run_dir = Path(cfg.train.run_dir or default_run_dir(cfg)).absolute()
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))  # one run dir for all ranks
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # rank 0 rewrites RUN_DIR/config.yaml while others may read: give the ranks their own copy
    cfg_path = logs / "config.yaml"
    save_config(cfg, cfg_path)
    port = free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for rank in range(nproc):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", NODE_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=threads,
                       VIDSCALE_CONFIG=str(cfg_path))
            out = None
            if rank > 0:
                out = open(logs / f"rank{rank}.log", "w")
                files.append(out)
            procs.append(subprocess.Popen([sys.executable, "-m", "vidscale.scaling.train.loop"], env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None,
                                          preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]
            # EXIT_REQUEUE: the rank saved a pre-emption checkpoint and stopped on purpose
            failed = [r for r, c in enumerate(codes) if c not in (None, 0, EXIT_REQUEUE)]
            if failed:
                rank, code = failed[0], codes[failed[0]]
                _stop(procs)
                if rank > 0:
                    print(_tail(logs / f"rank{rank}.log"), file=sys.stderr)
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit code {code})"
                print(f"vidscale train: rank {rank} of {nproc} {how}; "
                      f"stopped the other ranks; log: {logs / f'rank{rank}.log' if rank else 'above'}",
                      file=sys.stderr)
                return code if code > 0 else 128 - code  # a signal: the shell's 128 + N
            if all(c is not None for c in codes):
                return max(codes)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        for f in files:
            f.close()


# -- in-process spawning (tests and benchmarks) ----------------------------------------------
def _rank_entry(fn, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    fn(rank, world, port, *args)


def spawn_ranks(fn, world: int, args: tuple = (), timeout_s: float = 900.0) -> list[int]:
    """Run `fn(rank, world, port, *args)` in `world` spawned processes; return their exit codes.

    Like `launch_local`, a failing rank stops the others at once (rather than leaving them
    in a collective until its timeout). Exit codes are returned, not raised: callers judge
    what the ranks wrote (a rank can abort at interpreter exit after finishing its work).
    `fn` must be importable (a module-level function).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(fn, r, world, port, tuple(args))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                time.sleep(1.0)  # let the others finish writing what they have
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs]

