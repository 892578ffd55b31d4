"""`logging.wandb`: a Weights & Biases sink beside metrics.jsonl and TensorBoard (rank 0 only).

It logs what metrics.jsonl logs, at the same steps; the resolved config; and the sample
videos `logging.sample_every` writes (their paths handed over by the loop, `files()`). Tracking must never cost the run: `wandb` is imported
here (an optional extra), `wandb.init` runs under `logging.wandb_timeout_s`, and any
failure (package missing, no API key, service unreachable, a log call that raises) prints one
warning line and turns the sink off while training goes on.

Files: RUN_DIR/wandb/ (wandb's own directory: offline runs, logs) and RUN_DIR/wandb/run_id,
so that a resumed run continues the same wandb run. The steps a resume trains again were
already logged with the same values (resume is bit-exact); wandb keeps the first ones.
"""
from __future__ import annotations

import re
import secrets
import sys
from pathlib import Path

from vidscale.scaling.config import LoggingArgs
from vidscale.scaling.train.metrics import scalars

RUN_ID_FILE = "run_id"
"""RUN_DIR/wandb/run_id: the wandb run this run directory logs to."""

_SAMPLE = re.compile(r"step_(\d+)_(\d+)(?:_(\d+))?\.(mp4|png)$")
"""The names TrainingSamples writes: step_<N>_<k>.mp4, or step_<N>_<k>_<frame>.png."""


def _warn(what: str, e: BaseException) -> None:
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    print(f"warning: logging.wandb: {what} ({msg}); training goes on without wandb", file=sys.stderr, flush=True)


class WandbSink:
    """Same interface as the other sinks: `log(step, values)`, `close()`. Never raises."""

    def __init__(self, run_dir: str | Path, args: LoggingArgs, config: dict, group: str):
        """`config`: the resolved recipe, as wandb's run config; `group`: the recipe's name."""
        self.run_dir = Path(run_dir)
        self._pending: list[Path] = []  # sample files handed over, not yet logged
        self._run = None
        try:
            import wandb  # the optional extra `wandb`: only a run that asks for it needs it

            self._wandb = wandb
            wdir = self.run_dir / "wandb"
            wdir.mkdir(parents=True, exist_ok=True)
            id_file = wdir / RUN_ID_FILE
            # `secrets`, not `random`: drawing the id leaves the training RNG streams untouched
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self._run = wandb.init(
                project=args.wandb_project, entity=args.wandb_entity or None, mode=args.wandb_mode or None,
                dir=str(self.run_dir), id=run_id, resume="allow", name=self.run_dir.name, group=group, config=config,
                # the launcher keeps the console output; wandb must not wrap stdout/stderr
                settings=wandb.Settings(init_timeout=args.wandb_timeout_s, finish_timeout=args.wandb_timeout_s,
                                        console="off"))
        except ImportError as e:
            _warn("could not start: pip install 'vidscale[wandb]'", e)
        except Exception as e:  # noqa: BLE001 - tracking is never a reason to stop training
            _warn("could not start", e)
            self._run = None

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, step: int, values: dict) -> None:
        if self._run is None:
            return
        try:
            self._log_samples(step)
            self._run.log(scalars(values), step=step)
        except Exception as e:  # noqa: BLE001
            _warn(f"logging step {step} failed", e)
            self._stop()

    def files(self, paths: list[Path]) -> None:
        """Sample files the run wrote (TrainingSamples, during the task's step hook): logged with
        the next record, each at its own step. Their names carry the step and prompt."""
        if self._run is not None:
            self._pending += [Path(p) for p in paths if _SAMPLE.match(Path(p).name)]

    def _log_samples(self, step: int) -> None:
        """The sample files handed over since the last call, each at its own step (<= `step`)."""
        new, self._pending = sorted(self._pending, key=lambda p: p.name), []
        by_step: dict[int, dict[str, list[Path]]] = {}
        for p in new:
            s, k = (int(g) for g in _SAMPLE.match(p.name).groups()[:2])
            by_step.setdefault(s, {}).setdefault(f"samples/{k}", []).append(p)
        for s in sorted(by_step):
            row = {}
            for key, paths in by_step[s].items():
                if paths[0].suffix == ".mp4":
                    row[key] = self._wandb.Video(str(paths[0]), format="mp4")
                else:  # png: the prompt's frames in order
                    row[key] = [self._wandb.Image(str(p)) for p in paths]
            self._run.log(row, step=min(s, step))

    def _stop(self) -> None:
        run, self._run = self._run, None
        try:
            run.finish(exit_code=0)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._run is None:
            return
        try:
            self._log_samples(1 << 62)  # the last samples; their own steps
            self._run.finish()
        except Exception as e:  # noqa: BLE001
            _warn("finishing failed", e)
        self._run = None
