"""What a sweep keeps on disk: each run's status (SWEEP_DIR/state.json), the results table
(SWEEP_DIR/results.csv, columns `COLUMNS`) and the completion marker every run writes,
RUN_DIR/final.json (written atomically after its validation loss: `scaling/train/evaluate.py`).

A run is finished exactly when its final.json exists; the ledger's statuses (pending,
running, done, failed, interrupted) only describe the rest.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

COLUMNS = ["name", "params", "tokens", "flops", "loss", "status", "wall_time",
           "budget", "model", "steps", "lr", "tokens_per_batch", "seed", "run_dir"]
"""results.csv, in this order (`vidscale fit` and external scripts read it)."""
STATE = "state.json"
RESULTS = "results.csv"
FINAL = "final.json"


def read_final(run) -> dict | None:
    """A planned run's final.json (val_loss, params, tokens, flops, steps), or None while unfinished."""
    p = Path(run.cfg.train.run_dir) / FINAL
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Ledger:
    """Per-run status and accumulated wall time (SWEEP_DIR/state.json), and results.csv."""

    def __init__(self, sweep_dir: Path, runs):
        self.dir, self.runs = sweep_dir, runs
        self.path = sweep_dir / STATE
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
        atomic_write(self.path, json.dumps(self.state, indent=1))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(self.rows())
        atomic_write(self.dir / RESULTS, buf.getvalue())
