"""Run metrics: metrics.jsonl (every logged step), TensorBoard scalars, a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no branches."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, total: int = 0, initial: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # appended on resume
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k.replace(".", "/"), v, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def tb(self):
        return self._tb

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
