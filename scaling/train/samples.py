"""Sample videos during training (`logging.sample_every`, `logging.sample_prompts`).

Every rank calls `write_train_samples(tr)` at the same step. Without ZeRO-3 only rank 0
samples (the others go on to the next step and meet it at the next collective). Under ZeRO-3
a forward gathers parameters collectively, so every rank runs the same sampler on the same
inputs and rank 0 writes. Under sequence parallelism the model's attention expects a slice
of the sequence: sampling there is skipped with a warning (sample from the exported weights
with `vidscale sample` instead).

Written: TensorBoard images `samples/<k>` (the frames side by side, one image per prompt)
and RUN_DIR/samples/step_<N>_<k>.mp4.
"""
from __future__ import annotations

import warnings

import torch

SAMPLE_STEPS = 20


def _latent_shape(tr):
    c = tr.cfg
    C = c.model.in_channels
    if c.data.source == "synthetic":
        H, W = c.data.sizes[0]
        return (C, c.data.frames[1], H, W)
    from vidscale.data.shards import read_index
    s = read_index(c.data.source)["shards"][0]["shapes"][0]
    return (C, *s)


def _texts(tr, prompts):
    c = tr.cfg
    try:
        from vidscale.models.text import TextEncoder
        enc = TextEncoder(c.data.text_encoder)
        if enc.dim == c.model.text_dim:
            return enc.encode(prompts)
    except Exception as e:  # noqa: BLE001 - no text encoder here: sample unconditionally
        warnings.warn(f"training samples: text encoder {c.data.text_encoder!r} unavailable ({e}); unconditional")
    return [torch.zeros(0, c.model.text_dim) for _ in prompts]


def write_train_samples(tr) -> None:
    from vidscale.scaling.inference.sample import sample_latent, to_uint8, write_frames

    d = tr.dims
    zero3 = getattr(tr.engine, "stage", 0) == 3
    if d.sp > 1:
        if tr.is_main and not getattr(tr, "_warned_sp_samples", False):
            warnings.warn("logging.sample_every: no training samples under sequence parallelism")
            tr._warned_sp_samples = True
        return
    if not (tr.is_main or zero3):
        return
    c = tr.cfg
    if not hasattr(tr, "_sample_texts"):
        tr._sample_texts = _texts(tr, list(c.logging.sample_prompts))
    shape = _latent_shape(tr)
    was = tr.model.training
    tr.model.eval()
    lats = [sample_latent(tr.model, tr.objective, text, shape, c.model.patch, steps=SAMPLE_STEPS, seed=k,
                          device=tr.device) for k, text in enumerate(tr._sample_texts)]
    tr.model.train(was)
    if not tr.is_main:
        return
    from vidscale.models.latent import build_latent_encoder
    enc = build_latent_encoder(c.data.encoder, c.model.in_channels)
    out = tr.run_dir / "samples"
    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(tr.run_dir / "tb")) if c.logging.tensorboard else None
    except Exception:  # noqa: BLE001 - TensorBoard is optional
        tb = None
    for k, lat in enumerate(lats):
        with torch.no_grad():
            frames = enc.decode(lat[None].float())[0].clamp(-1, 1)  # 3 x T x H x W
        u8 = to_uint8(frames)
        write_frames(out / f"step_{tr.step:07d}_{k}.mp4", u8)
        if tb is not None:  # one image: the frames left to right
            strip = torch.from_numpy(u8).permute(3, 1, 0, 2).reshape(3, u8.shape[1], -1)
            tb.add_image(f"samples/{k}", strip, tr.step)
    if tb is not None:
        tb.close()
