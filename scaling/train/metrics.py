"""Run metrics: metrics.jsonl (every logged step), TensorBoard scalars, a progress bar, more sinks
(wandb_sink.py); the samples each data-parallel rank trained on (consumed/dpNNNNN.jsonl,
`data.record_consumed`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from vidscale.scaling.checkpoint.manager import truncate_metrics


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no branches."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, total: int = 0, initial: int = 0, sinks: list | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        self._sinks = sinks or []  # each with log(step, values), files(paths), close(): WandbSink
        if not enabled:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # appended on resume
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # this start logs every step after `initial` again: TensorBoard hides the earlier
            # starts' events from there on (a SessionLog START), so a restart reads as one run;
            # a start at step 0 logs step 0 (init_from) again too
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=initial + 1 if initial else 0)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, x in scalars(values, dots_as_slashes=True).items():
                if math.isfinite(x):
                    self._tb.add_scalar(k, x, step)
        for sink in self._sinks:
            sink.log(step, values)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)

    def files(self, paths: list[Path]) -> None:
        """Files the run wrote (samples) for the sinks that upload them; each sink logs them at
        their own step (in the name) with its next record."""
        if self.enabled and paths:
            for sink in self._sinks:
                sink.files(paths)

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
        for sink in self._sinks:
            sink.close()
        self._file.close()


def scalars(values: dict, dots_as_slashes: bool = False) -> dict[str, float]:
    """The numbers of a metrics record by name, what each sink plots: a `{source: share}` value
    gives one scalar per source, `source_share/NAME`. `dots_as_slashes`: `split.attention` as
    `split/attention` (TensorBoard groups by the part before a slash)."""
    out = {}
    for k, v in values.items():
        key = k.replace(".", "/") if dots_as_slashes else k
        for name, x in (v.items() if isinstance(v, dict) else [("", v)]):
            if isinstance(x, (int, float)):
                out["/".join(filter(None, (key, name)))] = x
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


class ConsumedLog:
    """`data.record_consumed`: the samples one dp rank trained on, observed rather than
    recomputed. The loader reports each batch the training process takes (`on_batch`; never
    those its workers prefetched); `write(step)` appends one {"step", "epoch", "keys"} line per
    epoch of the step to RUN_DIR/consumed/dpNNNNN.jsonl once the step is done."""

    def __init__(self, run_dir: str | Path, dp_rank: int):
        self.dir = Path(run_dir) / "consumed"
        self.dp_rank = dp_rank
        self.path = self.dir / f"dp{dp_rank:05d}.jsonl"
        self._pending: list[tuple[int, list[str]]] = []

    def on_batch(self, epoch: int, names) -> None:
        if self._pending and self._pending[-1][0] == epoch:
            self._pending[-1][1].extend(names)
        else:
            self._pending.append((epoch, list(names)))

    def write(self, step: int) -> None:
        if not self._pending:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.writelines(json.dumps({"step": step, "epoch": e, "keys": k}) + "\n" for e, k in self._pending)
        self._pending = []

    def truncate(self, step: int, dp: int) -> None:
        """On resume from `step`: drop the records the interrupted run wrote after it (they are
        trained again). Each rank truncates its own file; dp rank 0 also those of old ranks
        beyond the new dp size, which nobody else opens."""
        self._pending = []
        truncate_metrics(self.path, step)
        if self.dp_rank == 0 and self.dir.is_dir():
            for p in sorted(self.dir.glob("dp*.jsonl")):
                if int(p.stem[2:]) >= dp:
                    truncate_metrics(p, step)
