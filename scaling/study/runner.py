"""Running a planned sweep: every run is a `vidscale train` of its resolved recipe
(SWEEP_DIR/recipes/NAME.yaml) in its own process, through the launcher asked for.

    local   one run after another here
    ray     concurrent runs on one Ray cluster (an embedded local one unless an address is
            given), as many at once as its CPUs hold
    slurm   one job array, a task per unfinished run (`cluster/jobarray.py`); wsd-branches
            one array per wave: the trunks, then the branches their checkpoints made ready

A run is finished when its final.json exists (`ledger.py`): running the same sweep again
skips finished runs and restarts the others with checkpoint.resume=auto, so they continue
from their latest complete checkpoint. SWEEP_DIR/state.json and results.csv are rewritten
at every change; progress lines go to stdout.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from vidscale.cluster.jobarray import (cancel_array, common_header, follow_array, render_array, submit_array,
                                       task_id)
from vidscale.cluster.ray_cluster import EmbeddedRay
from vidscale.cluster.slurm import write_job
from vidscale.scaling.checkpoint.storage import committed, step_of
from vidscale.scaling.config import RecipeError, load_config, save_config
from vidscale.scaling.study.ledger import Ledger, atomic_write, read_final
from vidscale.scaling.study.plan import cost, flatten


def run_command(recipe: Path, launcher: str, address: str) -> list[str]:
    """The `vidscale train` command line of one run."""
    cmd = [sys.executable, "-m", "vidscale.scaling.cli", "train", str(recipe), "--launcher", launcher]
    if launcher == "ray" and address:
        cmd += ["--address", address]
    if launcher == "slurm":
        cmd += ["--wait"]
    return cmd


def _last_metrics(run) -> dict:
    p = Path(run.cfg.train.run_dir) / "metrics.jsonl"
    try:
        with open(p, "rb") as f:
            f.seek(max(0, os.path.getsize(p) - 4096))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return json.loads(last)
    except (OSError, ValueError, IndexError):
        return {}


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def write_plan(sweep, runs) -> None:
    """SWEEP_DIR/plan.json: every run's planned size, length and FLOPs."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    (sweep.dir / "plan.json").write_text(json.dumps(
        [{"name": r.name, "model": r.model, "budget": r.budget, "params": r.params, "steps": r.steps,
          "tokens": r.tokens, "flops": r.flops, "lr": r.lr, "tokens_per_batch": r.tokens_per_batch,
          "seed": r.seed, "trunk": r.trunk, "branch_step": r.branch_step, "spent_flops": r.spent_flops}
         for r in runs], indent=1))
    (sweep.dir / "cost.json").write_text(json.dumps(cost(runs), indent=1))


def branch_ready(run) -> bool:
    """A branch may start once its trunk's checkpoint at the branch point is committed (or it
    has checkpoints of its own: a branch that is resumed)."""
    if not run.trunk or committed(Path(run.cfg.train.run_dir) / "checkpoints"):
        return True
    src = Path(run.cfg.checkpoint.branch_from)
    return step_of(src.name) in {s for s, _ in committed(src.parent)}


LAUNCH_KEYS = ("train.run_dir", "train.device", "checkpoint.", "cluster.", "logging.")
"""Recipe keys (a trailing dot: a whole section) in which a finished run's saved recipe may
differ from its planned one: where it ran, how it was launched, resumed, checkpointed and logged
(a Ray worker without a GPU trains with train.device=cpu). What a run trains and the data it
sees are compared; a wsd branch's start point (checkpoint.branch_from) and the world size
(cluster.nproc) with them."""
_COMPARED = ("checkpoint.branch_from", "cluster.nproc")


def recipe_difference(saved, planned) -> str | None:
    """The first key (in recipe order) where a run's saved recipe and the planned one differ
    beyond `LAUNCH_KEYS`, as `key: saved -> planned`; None when they agree."""
    a, b = (flatten(OmegaConf.to_container(OmegaConf.structured(c))) for c in (saved, planned))
    for key in dict.fromkeys([*b, *a]):
        if key not in _COMPARED and any(key == k or (k.endswith(".") and key.startswith(k)) for k in LAUNCH_KEYS):
            continue
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
    return None


def check_finished_runs(sweep, runs) -> None:
    """A finished run of another plan (other steps, another lr, schedule, data ...) would be
    silently reused and fitted: refuse, naming the run and the first key that differs."""
    for r in runs:
        fin = read_final(r)
        if fin is None:
            continue
        hint = (f": a changed sweep needs its own sweep directory (another `name:` or sweep_dir in "
                f"{sweep.path}, or --sweep-dir)")
        if fin.get("steps") != r.steps:
            raise ValueError(f"{r.cfg.train.run_dir}/final.json: run {r.name} finished with {fin.get('steps')} "
                             f"steps but the sweep now plans {r.steps}{hint}")
        saved = Path(r.cfg.train.run_dir) / "config.yaml"
        try:
            diff = recipe_difference(load_config(saved), r.cfg)
        except (OSError, RecipeError) as e:
            raise ValueError(f"{saved}: run {r.name} is finished but its saved recipe cannot be compared with "
                             f"the plan ({str(e).splitlines()[0]}){hint}") from None
        if diff is not None:
            raise ValueError(f"{saved}: run {r.name} finished with another recipe than the sweep now plans "
                             f"({diff}){hint}")


OWNER = "sweep.json"
"""SWEEP_DIR/sweep.json: the sweep file the directory belongs to (its path and a hash of its
text), so that another sweep (two files without `name:` share runs/sweeps/sweep) is refused."""


def claim_sweep_dir(sweep) -> None:
    """Record which sweep file SWEEP_DIR belongs to, or refuse another one. The same file
    (edited or not), or a moved copy of its text, is the same sweep; an old directory without
    the record is taken over."""
    path, text = str(Path(sweep.path).resolve()), Path(sweep.path).read_bytes()
    digest = hashlib.sha256(text).hexdigest()
    owner = sweep.dir / OWNER
    try:
        old = json.loads(owner.read_text())
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as e:
        raise ValueError(f"{owner}: unreadable ({e}); it says which sweep file this sweep directory belongs "
                         f"to: delete it only if the directory is {sweep.path}'s") from None
    if old is not None and old.get("sweep_file") != path and old.get("sha256") != digest:
        raise ValueError(f"{sweep.dir}: this sweep directory belongs to another sweep ({old.get('sweep_file')}, "
                         f"{OWNER}); give {sweep.path} its own `name:` or sweep_dir, or pass --sweep-dir")
    sweep.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(owner, json.dumps({"sweep_file": path, "sha256": digest, "name": sweep.args.name}, indent=1))


class Runner:
    """Runs as subprocesses here, `concurrency` at a time (local: 1; Ray: what the cluster holds)."""

    def __init__(self, sweep, runs, launcher: str, address: str, concurrency: int, progress_every: float):
        self.sweep, self.runs, self.launcher, self.address = sweep, runs, launcher, address
        self.concurrency, self.progress_every = max(1, concurrency), progress_every
        self.dir = sweep.dir
        self.ledger = Ledger(self.dir, runs)
        self.running: dict[str, tuple] = {}  # name -> (Popen, start time, run)

    def say(self, msg: str) -> None:
        c = self.ledger.counts()
        head = (f"[sweep {self.sweep.args.name}] {time.strftime('%H:%M:%S')} done {c.get('done', 0)}/{len(self.runs)}"
                f" running {c.get('running', 0)} failed {c.get('failed', 0)}")
        print(f"{head} | {msg}", flush=True)

    def recipe(self, run) -> Path:
        """SWEEP_DIR/recipes/NAME.yaml, the run's resolved recipe, written."""
        p = self.dir / "recipes" / f"{run.name}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, p)
        return p

    def start(self, run) -> None:
        recipe = self.recipe(run)
        Path(run.cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "logs" / f"{run.name}.log", "a")
        env = dict(os.environ)
        # a run's ranks share the machine with the other runs: no oversubscribed thread pools
        per = max(1, (os.cpu_count() or 1) // (self.concurrency * run.cfg.cluster.nproc))
        env.setdefault("OMP_NUM_THREADS", str(per))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        st = self.ledger.state[run.name]
        proc = subprocess.Popen(run_command(recipe, self.launcher, self.address), stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.getcwd())
        log.close()
        self.running[run.name] = (proc, time.time(), run)
        resumed = " (resuming)" if st["attempts"] else ""
        self.ledger.set(run.name, status="running", attempts=st["attempts"] + 1)
        self.say(f"started {run.name}: {run.params / 1e6:.2f}M params, {run.steps} steps, "
                 f"{run.flops:.3g} FLOPs{resumed}")

    def poll(self) -> None:
        for name, (proc, t0, run) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.running[name]
            wall = self.ledger.state[name]["wall_time"] + time.time() - t0
            fin = read_final(run)
            if rc == 0 and fin is not None:
                self.ledger.set(name, status="done", wall_time=wall)
                self.say(f"finished {name}: val loss {fin['val_loss']:.4f} in {wall:.0f} s")
            elif rc == 0:  # trained to the end but wrote no validation loss: a log tail would not say why
                self.ledger.set(name, status="failed", wall_time=wall, exit_code=rc)
                self.say(f"FAILED {name}: exited 0 without final.json ({run.cfg.train.run_dir}): it wrote no "
                         f"validation loss (train.val_videos = {run.cfg.train.val_videos}, task {run.cfg.task})")
            else:
                self.ledger.set(name, status="failed", wall_time=wall, exit_code=rc)
                self.say(f"FAILED {name} (exit {rc}): {_tail(self.dir / 'logs' / f'{name}.log')[-400:]}")

    def blocked(self, todo: list) -> list:
        """Branches whose trunk ended without reaching their branch point: failed, with why."""
        for r in todo:
            self.ledger.set(r.name, status="failed")
            self.say(f"FAILED {r.name}: its trunk {r.trunk} ended ({self.ledger.state[r.trunk]['status']}) "
                     f"without a checkpoint at step {r.branch_step}")
        return []

    def progress(self) -> None:
        parts = []
        for name, (_, t0, run) in self.running.items():
            m = _last_metrics(run)
            step = f"step {int(m['step'])}/{run.steps} loss {m.get('loss', float('nan')):.4f}" if m else "starting"
            parts.append(f"{name}: {step} ({time.time() - t0:.0f} s)")
        self.say("; ".join(parts) or "idle")

    def stop_all(self) -> None:
        for name, (proc, t0, _) in self.running.items():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for name, (proc, t0, _) in self.running.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.ledger.set(name, status="interrupted",
                            wall_time=self.ledger.state[name]["wall_time"] + time.time() - t0)
        self.running.clear()

    def run(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        todo = [r for r in self.runs if self.ledger.state[r.name]["status"] != "done"]
        skipped = len(self.runs) - len(todo)
        self.ledger.save()
        if skipped:
            self.say(f"{skipped} finished run(s) skipped; {len(todo)} to run")
        last = time.time()
        try:
            while todo or self.running:
                while todo and len(self.running) < self.concurrency:
                    ready = next((r for r in todo if branch_ready(r)), None)
                    if ready is None:
                        break
                    todo.remove(ready)
                    self.start(ready)
                if todo and not self.running:  # nothing runs that could still make a branch point
                    todo = self.blocked(todo)
                    continue
                time.sleep(0.5)
                self.poll()
                if self.running and time.time() - last >= self.progress_every:
                    self.progress()
                    last = time.time()
        except BaseException:
            self.stop_all()
            raise


class SlurmArrayRunner(Runner):
    """Each run's own sbatch script is written as for `vidscale train --launcher slurm`
    (`cluster/slurm.py`); one job array per wave runs task i as run i's script
    (`cluster/jobarray.py`): every run when there are no branches, else the trunks first."""

    def run(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        todo = [r for r in self.runs if self.ledger.state[r.name]["status"] != "done"]
        self.ledger.save()
        if len(todo) < len(self.runs):
            self.say(f"{len(self.runs) - len(todo)} finished run(s) skipped; {len(todo)} to run")
        # one array per wave: trunks (and branches whose branch point exists) first, then the
        # branches their checkpoints made ready
        while todo:
            wave = [r for r in todo if branch_ready(r)]
            if not wave:
                self.blocked(todo)
                return
            todo = [r for r in todo if r not in wave]
            self.run_array(wave)

    def run_array(self, todo: list) -> None:
        scripts = []
        for r in todo:
            self.recipe(r)
            scripts.append(write_job(r.cfg)[1])
        header = common_header(scripts)
        if header is None:
            raise ValueError(f"{self.sweep.path}: the runs ask Slurm for different resources (cluster.nproc / "
                             "cluster.slurm.*); a job array needs one shape: use --launcher local or ray")
        name = self.sweep.args.name
        path = self.dir / "sweep.sbatch"
        path.write_text(render_array(f"sweep '{name}'", f"vidscale-sweep-{name}", header, scripts,
                                     [r.name for r in todo], self.dir / "logs"))
        job = submit_array(path, "sweep's job array")
        t0 = time.time()
        for i, r in enumerate(todo):
            st = self.ledger.state[r.name]
            self.ledger.set(r.name, status="running", attempts=st["attempts"] + 1, slurm_job=task_id(job, i))
        self.say(f"submitted job array {job} ({len(todo)} tasks): {path}")
        active, last = set(range(len(todo))), time.time()
        try:
            for i in follow_array(job, len(todo)):
                if i is None:  # one poll of the queue done
                    if active and time.time() - last >= self.progress_every:
                        self.running = {todo[k].name: (None, t0, todo[k]) for k in active}
                        self.progress()
                        last = time.time()
                    continue
                active.discard(i)
                run, tid = todo[i], task_id(job, i)
                wall = self.ledger.state[run.name]["wall_time"] + time.time() - t0
                fin = read_final(run)
                if fin is not None:
                    self.ledger.set(run.name, status="done", wall_time=wall)
                    self.say(f"finished {run.name} (task {tid}): val loss {fin['val_loss']:.4f}")
                else:
                    self.ledger.set(run.name, status="failed", wall_time=wall)
                    self.say(f"FAILED {run.name} (task {tid}): {_tail(self.dir / 'logs' / f'{run.name}.log')[-400:]}")
        except BaseException:  # interrupted, or Slurm unreachable too long: rerunning the sweep resumes
            for i in active:
                self.ledger.set(todo[i].name, status="interrupted")
            cancel_array(job)
            raise
        finally:
            self.running = {}


def _ray_concurrency(runs, cpus: int) -> int:
    need = max(r.cfg.cluster.nproc * r.cfg.cluster.cpus_per_worker for r in runs)
    return max(1, int(cpus // need))


def run_sweep(sweep, runs, launcher: str = "local", address: str = "", cpus: int = 0,
              progress_every: float = 15.0) -> list[dict]:
    """Run every unfinished run of the plan; returns the results rows (`ledger.COLUMNS`).
    Ray without an address: an embedded cluster of `cpus` CPUs (0: all), stopped at the end."""
    claim_sweep_dir(sweep)
    check_finished_runs(sweep, runs)  # before anything of a refused plan is written
    write_plan(sweep, runs)
    if launcher == "ray":
        cpus = cpus or os.cpu_count() or 1
        if address:
            runner = Runner(sweep, runs, "ray", address, _ray_concurrency(runs, cpus), progress_every)
            runner.run()
        else:
            with EmbeddedRay(cpus) as address:
                runner = Runner(sweep, runs, "ray", address, _ray_concurrency(runs, cpus), progress_every)
                runner.run()
    elif launcher == "slurm":
        runner = SlurmArrayRunner(sweep, runs, "slurm", "", len(runs), progress_every)
        runner.run()
    else:
        runner = Runner(sweep, runs, "local", "", 1, progress_every)
        runner.run()
    return runner.ledger.rows()
