"""Sample videos during training (`logging.sample_every`, `logging.sample_prompts`).

Every rank calls `TrainingSamples.write` at the same step. The sample comes from the EMA
weights when the run keeps an EMA (`engine.ema_weights()`: under ZeRO-3 swapped into the
partitions one parameter at a time, never consolidated on a rank), else the trained ones.
Without ZeRO-3 or sequence parallelism only rank 0 samples (the others go on to the next
step and meet it at the next collective). Under ZeRO-3 a forward gathers parameters
collectively, and under sequence parallelism (`parallel.ulysses` / `parallel.ring`) each
rank's attention holds a slice of the sequence: there every rank runs the same sampler with
the same seed, each forward through the training layout (scaling/inference/parallel.py:
this rank's slice in, the sp group's prediction gathered out), and rank 0 writes.

Written: TensorBoard images `samples/<k>` (the frames side by side, one image per prompt)
and RUN_DIR/samples/step_<N>_<k>.mp4 (`logging.sample_format: png`: step_<N>_<k>_<frame>.png).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vidscale.data.args import shard_sets
from vidscale.data.shards import read_index
from vidscale.models.latent import build_latent_encoder
from vidscale.models.text import TextEncoder
from vidscale.scaling.inference.parallel import SequenceParallelCall
from vidscale.scaling.inference.sample import sample_latent, to_uint8, write_frames
from vidscale.scaling.train.precision import autocast_for

SAMPLE_STEPS = 20


class TrainingSamples:
    """Writes sample videos from the current weights; every rank calls `write` at the same step."""

    def __init__(self, cfg, dims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self._texts = None

    def _latent_shape(self):
        c = self.cfg
        C = c.model.in_channels
        sets = shard_sets(c.data)  # data.sources, or the one data.source; none for synthetic data
        if not sets:
            H, W = c.data.sizes[0]
            return (C, c.data.frames[1], H, W)
        path, key, _, _ = sets[0]
        return (C, *read_index(path, key)["shards"][0]["shapes"][0])

    def _encode(self, prompts):
        c = self.cfg
        try:
            enc = TextEncoder(c.data.text_encoder)
            if enc.dim == c.model.text_dim:
                return enc.encode(prompts)
        except Exception as e:  # noqa: BLE001 - no text encoder here: sample unconditionally
            warnings.warn(f"training samples: text encoder {c.data.text_encoder!r} unavailable ({e}); unconditional")
        return [torch.zeros(0, c.model.text_dim) for _ in prompts]

    def write(self, engine, objective, step: int, run_dir: Path) -> list[Path]:
        """The files written: rank 0's; [] on the other ranks."""
        d, c = self.dims, self.cfg
        # a forward under ZeRO-3 gathers parameters and one under sp holds a slice of the
        # sequence, both collectively: then every rank samples along
        if not (d.rank == 0 or engine.gathers_params or d.sp > 1):
            return []
        if self._texts is None:
            self._texts = self._encode(list(c.logging.sample_prompts))
        shape = self._latent_shape()
        model = engine.module
        call = SequenceParallelCall(model, d)
        was = model.training
        model.eval()
        # the weights may be bf16 (DeepSpeed on GPU): autocast as in training
        with engine.ema_weights(), autocast_for(c.train.dtype, self.device):
            lats = [sample_latent(model, objective, text, shape, c.model.patch, steps=SAMPLE_STEPS, seed=k,
                                  device=self.device, model_call=call) for k, text in enumerate(self._texts)]
        model.train(was)
        if d.rank != 0:
            return []
        enc = build_latent_encoder(c.data.encoder, c.model.in_channels)
        out = Path(run_dir) / "samples"
        tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(Path(run_dir) / "tb")) if c.logging.tensorboard else None
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            tb = None
        written = []
        for k, lat in enumerate(lats):
            with torch.no_grad():
                frames = enc.decode(lat[None].float())[0].clamp(-1, 1)  # 3 x T x H x W
            u8 = to_uint8(frames)
            written += write_frames(out / f"step_{step:07d}_{k}.{c.logging.sample_format}", u8)
            if tb is not None:  # one image: the frames left to right
                strip = torch.from_numpy(u8).permute(3, 1, 0, 2).reshape(3, u8.shape[1], -1)
                tb.add_image(f"samples/{k}", strip, step)
        if tb is not None:
            tb.close()
        return written
