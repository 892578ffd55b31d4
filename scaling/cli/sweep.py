"""`vidscale sweep SWEEP.yaml`: run an IsoFLOP sweep, then fit it and write its report.

Every run is a `vidscale train` of a resolved recipe (SWEEP_DIR/recipes/NAME.yaml) in its
own process, through the launcher asked for: local runs go one after another; on Ray they
share one cluster (an embedded local one unless --address) and run concurrently, as many
as its CPUs hold; on Slurm they are one job array, a task per unfinished run. A run is finished when RUN_DIR/final.json
exists (written atomically after its validation loss): rerunning the same command skips
finished runs and restarts the others with checkpoint.resume=auto, so they continue from
their latest complete checkpoint. SWEEP_DIR/results.csv is rewritten at every change; at
the end the fit (`scaling/fit.py`) and SWEEP_DIR/report.md with its plots.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ["name", "params", "tokens", "flops", "loss", "status", "wall_time",
           "budget", "model", "steps", "lr", "tokens_per_batch", "seed", "run_dir"]


def add_parser(sub):
    p = sub.add_parser("sweep", help="run a scaling-law sweep, fit it, write its report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file, e.g. recipes/sweeps/tiny.yaml")
    p.add_argument("--launcher", choices=["local", "ray", "slurm"], default="local",
                   help="local: one run after another here; ray: concurrent runs on a Ray cluster; "
                        "slurm: one job array, a task per run")
    p.add_argument("--address", default="", help="Ray cluster address (default: an embedded local cluster)")
    p.add_argument("--cpus", type=int, default=0, help="Ray: CPUs of the embedded cluster (default: all)")
    p.add_argument("--sweep-dir", help="override the sweep's sweep_dir")
    p.add_argument("--budget", type=float, nargs="+", action="extend", default=[], metavar="C",
                   help="predict the optimum at these budgets in the report (default 10x, 100x the largest)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the fit's intervals")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, tokens, FLOPs per run) and stop")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    return p


# --- state on disk ------------------------------------------------------------------------
def read_final(run) -> dict | None:
    p = Path(run.cfg.train.run_dir) / "final.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Ledger:
    """Per-run status and accumulated wall time (SWEEP_DIR/state.json), and results.csv."""

    def __init__(self, sweep_dir: Path, runs):
        self.dir, self.runs = sweep_dir, runs
        self.path = sweep_dir / "state.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.state = {r.name: {"status": "pending", "wall_time": 0.0, "attempts": 0, **old.get(r.name, {})}
                      for r in runs}
        for r in runs:
            if read_final(r) is not None:
                self.state[r.name]["status"] = "done"
            elif self.state[r.name]["status"] in ("running", "done"):  # died with the last sweep
                self.state[r.name]["status"] = "interrupted"

    def set(self, name: str, **kw) -> None:
        self.state[name].update(kw)
        self.save()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.state.values():
            out[s["status"]] = out.get(s["status"], 0) + 1
        return out

    def rows(self) -> list[dict]:
        rows = []
        for r in self.runs:
            st, fin = self.state[r.name], read_final(r)
            row = {"name": r.name, "params": r.params, "tokens": round(r.tokens), "flops": f"{r.flops:.6g}",
                   "loss": "", "status": st["status"], "wall_time": f"{st['wall_time']:.1f}",
                   "budget": f"{r.budget:g}", "model": r.model, "steps": r.steps, "lr": f"{r.lr:g}",
                   "tokens_per_batch": r.tokens_per_batch, "seed": r.seed, "run_dir": r.cfg.train.run_dir}
            if fin is not None:
                row.update(params=fin["params"], tokens=fin["tokens"], flops=f"{fin['flops']:.6g}",
                           loss=f"{fin['val_loss']:.6g}", status="done")
            rows.append(row)
        return rows

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(self.state, indent=1))
        import io
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(self.rows())
        _atomic_write(self.dir / "results.csv", buf.getvalue())


# --- launching one run ----------------------------------------------------------------------
def run_command(recipe: Path, launcher: str, address: str) -> list[str]:
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


class Runner:
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

    def start(self, run) -> None:
        from vidscale.scaling.config import save_config
        recipe = self.dir / "recipes" / f"{run.name}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, recipe)
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
            else:
                self.ledger.set(name, status="failed", wall_time=wall, exit_code=rc)
                self.say(f"FAILED {name} (exit {rc}): {_tail(self.dir / 'logs' / f'{name}.log')[-400:]}")

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
                    self.start(todo.pop(0))
                time.sleep(0.5)
                self.poll()
                if self.running and time.time() - last >= self.progress_every:
                    self.progress()
                    last = time.time()
        except BaseException:
            self.stop_all()
            raise


# --- Slurm: one job array, a task per unfinished run ------------------------------------------------
class SlurmArrayRunner(Runner):
    """Each run's own sbatch script (`cluster/slurm.py`: rendezvous, USR1 checkpoint-and-requeue)
    is written as for `vidscale train --launcher slurm`; one array job runs task i as run i's
    script (its #SBATCH lines are comments there: the array carries the shared resources)."""

    def run(self) -> None:
        import shlex
        from vidscale.cluster.slurm import _first_error, _run, write_job
        from vidscale.scaling.config import save_config

        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        todo = [r for r in self.runs if self.ledger.state[r.name]["status"] != "done"]
        self.ledger.save()
        if len(todo) < len(self.runs):
            self.say(f"{len(self.runs) - len(todo)} finished run(s) skipped; {len(todo)} to run")
        if not todo:
            return
        heads, scripts = set(), []
        for r in todo:
            save_config(r.cfg, self._recipe(r))
            _, script = write_job(r.cfg)
            scripts.append(script)
            heads.add(tuple(l for l in script.read_text().splitlines() if l.startswith("#SBATCH")
                            and not l.startswith(("#SBATCH --job-name", "#SBATCH --output"))))
        if len(heads) != 1:
            raise ValueError(f"{self.sweep.path}: the runs ask Slurm for different resources (cluster.nproc / "
                             "cluster.slurm.*); a job array needs one shape: use --launcher local or ray")
        q = shlex.quote
        array = "\n".join([
            "#!/bin/bash",
            f"# vidscale sweep '{self.sweep.args.name}': task i runs the i-th script below.",
            f"#SBATCH --job-name=vidscale-sweep-{self.sweep.args.name}"[:80],
            f"#SBATCH --array=0-{len(todo) - 1}",
            f"#SBATCH --output={self.dir}/logs/slurm-%A_%a.out",
            *heads.pop(),
            "SCRIPTS=(" + " ".join(q(str(s)) for s in scripts) + ")",
            "NAMES=(" + " ".join(q(r.name) for r in todo) + ")",
            f"LOGS={q(str(self.dir / 'logs'))}",
            "# exec keeps this shell's pid, so the USR1 of --signal=B: reaches the run's own trap",
            'exec bash "${SCRIPTS[$SLURM_ARRAY_TASK_ID]}" >>"$LOGS/${NAMES[$SLURM_ARRAY_TASK_ID]}.log" 2>&1', ""])
        path = self.dir / "sweep.sbatch"
        path.write_text(array)
        r = _run(["sbatch", "--parsable", str(path)])
        if r.returncode != 0:
            raise ValueError(f"Slurm refuses the sweep's job array ({path}): {_first_error(r.stderr)}")
        job = r.stdout.strip().split(";")[0]
        t0 = time.time()
        for i, r_ in enumerate(todo):
            st = self.ledger.state[r_.name]
            self.ledger.set(r_.name, status="running", attempts=st["attempts"] + 1, slurm_job=f"{job}_{i}")
        self.say(f"submitted job array {job} ({len(todo)} tasks): {path}")
        active, last = set(range(len(todo))), time.time()
        try:
            while active:
                time.sleep(2)
                q_ = _run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"])
                queued = {l.split()[0]: l.split()[1] for l in q_.stdout.splitlines() if l.strip()} \
                    if q_.returncode == 0 else {}
                for i in sorted(active):
                    run, tid = todo[i], f"{job}_{i}"
                    if tid in queued:
                        continue
                    active.discard(i)
                    wall = self.ledger.state[run.name]["wall_time"] + time.time() - t0
                    fin = read_final(run)
                    if fin is not None:
                        self.ledger.set(run.name, status="done", wall_time=wall)
                        self.say(f"finished {run.name} (task {tid}): val loss {fin['val_loss']:.4f}")
                    else:
                        self.ledger.set(run.name, status="failed", wall_time=wall)
                        self.say(f"FAILED {run.name} (task {tid}): {_tail(self.dir / 'logs' / f'{run.name}.log')[-400:]}")
                if active and time.time() - last >= self.progress_every:
                    self.running = {todo[i].name: (None, t0, todo[i]) for i in active}
                    self.progress()
                    last = time.time()
        except BaseException:
            _run(["scancel", job])
            for i in active:
                self.ledger.set(todo[i].name, status="interrupted")
            raise
        finally:
            self.running = {}

    def _recipe(self, run) -> Path:
        p = self.dir / "recipes" / f"{run.name}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


# --- Ray: one cluster shared by every run (started by cluster.ray_cluster) ---------------------
def _ray_concurrency(runs, cpus: int) -> int:
    need = max(r.cfg.cluster.nproc * r.cfg.cluster.cpus_per_worker for r in runs)
    return max(1, int(cpus // need))


# --- the command ------------------------------------------------------------------------------
def run(args) -> int:
    from vidscale.scaling.study.plan import load_sweep, plan

    sweep = load_sweep(args.sweep)
    if args.sweep_dir:
        sweep.dir = Path(args.sweep_dir).absolute()
    runs = plan(sweep)
    if args.dry_run:
        print(f"{'run':<28} {'params':>10} {'steps':>7} {'tokens':>10} {'FLOPs':>10}")
        for r in runs:
            print(f"{r.name:<28} {r.params:>10} {r.steps:>7} {r.tokens:>10.3g} {r.flops:>10.3g}")
        return 0
    sweep.dir.mkdir(parents=True, exist_ok=True)
    (sweep.dir / "plan.json").write_text(json.dumps(
        [{"name": r.name, "model": r.model, "budget": r.budget, "params": r.params, "steps": r.steps,
          "tokens": r.tokens, "flops": r.flops, "lr": r.lr, "tokens_per_batch": r.tokens_per_batch,
          "seed": r.seed} for r in runs], indent=1))
    for r in runs:  # a final.json from another plan would be silently fitted: refuse
        fin = read_final(r)
        if fin is not None and fin.get("steps") != r.steps:
            raise ValueError(f"{r.cfg.train.run_dir}/final.json: finished with {fin.get('steps')} steps but the "
                             f"sweep now plans {r.steps}: use a new sweep_dir for a changed sweep")
    # `kill` (SIGTERM) stops the sweep like Ctrl-C: its runs are stopped too, never orphaned
    signal.signal(signal.SIGTERM, _interrupt)
    if args.launcher == "ray":
        cpus = args.cpus or os.cpu_count() or 1
        if args.address:
            runner = Runner(sweep, runs, "ray", args.address, _ray_concurrency(runs, cpus), args.progress_every)
            runner.run()
        else:
            from vidscale.cluster.ray_cluster import EmbeddedRay
            with EmbeddedRay(cpus) as address:
                runner = Runner(sweep, runs, "ray", address, _ray_concurrency(runs, cpus), args.progress_every)
                runner.run()
    elif args.launcher == "slurm":
        runner = SlurmArrayRunner(sweep, runs, "slurm", "", len(runs), args.progress_every)
        runner.run()
    else:
        runner = Runner(sweep, runs, "local", "", 1, args.progress_every)
        runner.run()
    rows = runner.ledger.rows()
    failed = [r["name"] for r in rows if r["status"] != "done"]
    report = write_sweep_report(sweep, rows, args.budget, args.bootstrap)
    print(f"results: {sweep.dir / 'results.csv'}")
    print(f"report: {report}")
    print(f"TensorBoard: tensorboard --logdir {sweep.dir / 'runs'}")
    if failed:
        print(f"vidscale sweep: {len(failed)} run(s) did not finish: {failed} (rerun the same command to "
              f"resume them)", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def write_sweep_report(sweep, rows: list[dict], budgets: list[float], bootstrap: int) -> Path:
    from vidscale.scaling.study.fit import fit, public
    from vidscale.scaling.study.report import write_report

    done = [r for r in rows if r["status"] == "done"]
    notes = [f"Sweep `{sweep.path}` (base recipe `{sweep.base}`), {len(done)}/{len(rows)} runs done. "
             f"Loss: the deterministic validation loss of each run (`scaling/evaluate.py`)."]
    if len(done) < 5:
        return write_report(sweep.dir, None, rows, title=f"Sweep {sweep.args.name}",
                            notes=notes + [f"No fit: {len(done)} finished runs, a fit needs at least 5."])
    largest = max(float(r["budget"]) for r in done)
    budgets = budgets or [10 * largest, 100 * largest]
    try:
        result = fit(rows, budgets, bootstrap=bootstrap, where=str(sweep.dir / "results.csv"))
    except ValueError as e:
        return write_report(sweep.dir, None, rows, title=f"Sweep {sweep.args.name}",
                            notes=notes + [f"No fit: {e}"])
    (sweep.dir / "fit.json").write_text(json.dumps(public(result), indent=1))
    return write_report(sweep.dir, result, rows, title=f"Sweep {sweep.args.name}", notes=notes)

