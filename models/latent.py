"""Latent encoders: video frames <-> the C x T x H x W latents the DiT trains on.

Every encoder has the same interface:
    encode(frames_BCTHW in [-1, 1]) -> latent_BCTHW
    decode(latent_BCTHW) -> frames_BCTHW in [-1, 1]
and the attributes `channels`, `temporal` and `spatial` (compression factors). Like the
causal video VAEs (Wan, CogVideoX) T frames become 1 + (T - 1) / temporal latent frames:
the first frame is encoded alone, later frames in groups of `temporal`.

`PixelEncoder` is a STAND-IN, not a learned autoencoder: it average-pools pixels in space
and time and keeps a fixed orthonormal projection of the pooled sub-cells. It is
deterministic, weightless and fast, so CPU runs and tests exercise the real data path
(shapes, compression factors, channel count) without a pretrained VAE; its latents keep
colour and coarse layout only. Real runs use `DiffusersVAE` (a Wan or CogVideoX VAE from a
local path).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidscale.models.vae import VAELatentEncoder, load_vae


def latent_frames(frames: int, temporal: int) -> int:
    """Latent frames of a clip of `frames` frames (1 + 4k frames -> 1 + k latents)."""
    return 1 + (frames - 1) // temporal


def _haar_basis(channels: int) -> torch.Tensor:
    """[channels, 12] orthonormal rows over (RGB x 2x2 sub-cells): colour means first, then
    luminance edges (x, y, diagonal), then chroma edges. Fixed, so latents are reproducible."""
    haar = torch.tensor([[1., 1., 1., 1.], [1., -1., 1., -1.], [1., 1., -1., -1.], [1., -1., -1., 1.]]) / 2
    lum = torch.tensor([1., 1., 1.]) / math.sqrt(3)
    chroma = [torch.tensor([1., -1., 0.]) / math.sqrt(2), torch.tensor([1., 1., -2.]) / math.sqrt(6)]
    rows = [torch.kron(torch.eye(3)[c], haar[0]) for c in range(3)]       # mean R, G, B
    rows += [torch.kron(lum, haar[k]) for k in (1, 2, 3)]                 # luminance edges
    rows += [torch.kron(ch, haar[k]) for ch in chroma for k in (1, 2, 3)]  # chroma edges
    B = torch.stack(rows)  # [12, 12], orthonormal: kron of orthonormal bases
    if not 1 <= channels <= 12:
        raise ValueError(f"pixel encoder: channels={channels}: expected 1..12")
    return B[:channels]


class PixelEncoder(nn.Module):
    """Deterministic stand-in encoder: `spatial` x `spatial` and `temporal` x average pooling
    into `channels` (<= 12) channels; `decode` is the least-squares inverse of the
    projection followed by nearest upsampling (lossy: detail finer than a latent pixel and
    the dropped projection components are gone)."""

    def __init__(self, channels: int = 4, spatial: int = 8, temporal: int = 4, scale: float = 1.0):
        super().__init__()
        if spatial < 2 or spatial % 2:
            raise ValueError(f"pixel encoder: spatial={spatial}: expected an even factor >= 2")
        self.channels, self.spatial, self.temporal, self.scale = channels, spatial, temporal, scale
        self.register_buffer("basis", _haar_basis(channels), persistent=False)  # [C, 12]

    def _pool_time(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = x[:, :, :1], x[:, :, 1:]
        B, C, T, H, W = rest.shape
        Tk = T // self.temporal  # frames beyond 1 + k * temporal are dropped, like Wan does
        rest = rest[:, :, :Tk * self.temporal].reshape(B, C, Tk, self.temporal, H, W).mean(3)
        return torch.cat([first, rest], 2)

    @torch.no_grad()
    def encode(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = frames_BCTHW.shape
        s = self.spatial
        if H % s or W % s:
            raise ValueError(f"pixel encoder: frame size {H}x{W} is not divisible by spatial={s}")
        x = self._pool_time(frames_BCTHW.float())                       # B 3 T' H W
        Tl = x.shape[2]
        x = F.avg_pool2d(x.reshape(B, 3 * Tl, H, W), s // 2)           # 2x2 sub-cells per latent pixel
        x = x.reshape(B, 3, Tl, H // s, 2, W // s, 2)
        x = x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, Tl, H // s, W // s, 12)
        z = x @ self.basis.T                                           # B T' h w C
        return (z * self.scale).permute(0, 4, 1, 2, 3).contiguous()    # B C T' h w

    @torch.no_grad()
    def decode(self, latent_BCTHW: torch.Tensor) -> torch.Tensor:
        B, C, Tl, h, w = latent_BCTHW.shape
        s = self.spatial
        z = latent_BCTHW.float().permute(0, 2, 3, 4, 1) / self.scale    # B T' h w C
        x = (z @ self.basis).reshape(B, Tl, h, w, 3, 2, 2)             # least-squares inverse
        x = x.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, 3, Tl, 2 * h, 2 * w)
        x = x.repeat_interleave(s // 2, -1).repeat_interleave(s // 2, -2)
        # the first latent frame is one frame; each later one stands for `temporal` frames
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(self.temporal, 2)], 2)
        return x.clamp(-1, 1)


class DiffusersVAE(nn.Module):
    """A pretrained video VAE from a local diffusers folder (nothing downloads).

    kind 'wan' (AutoencoderKLWan: latents normalised by the config's latents_mean/std) or
    'cogvideox' (AutoencoderKLCogVideoX: latents times scaling_factor). Encoding takes the
    posterior mode, so preparation is deterministic."""

    def __init__(self, kind: str, path: str | Path, device: str = "cpu", dtype=torch.float32):
        super().__init__()
        import diffusers

        if not Path(path).is_dir():
            raise ValueError(f"data.encoder: VAE folder {str(path)!r} not found (expected a diffusers "
                             f"save_pretrained folder)")
        cls = {"wan": diffusers.AutoencoderKLWan, "cogvideox": diffusers.AutoencoderKLCogVideoX}.get(kind)
        if cls is None:
            raise ValueError(f"data.encoder: unknown VAE kind {kind!r}: expected wan or cogvideox")
        self.kind = kind
        self.vae = cls.from_pretrained(str(path), torch_dtype=dtype).to(device).eval()
        cfg = self.vae.config
        if kind == "wan":
            self.channels = int(cfg.z_dim)
            self.temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
            self.spatial = 2 ** (len(cfg.dim_mult) - 1)
            # on the VAE's device: encode's output lives there (`prepare --device cuda`)
            dev = self.vae.device
            self.register_buffer("mean", torch.tensor(cfg.latents_mean, device=dev).view(1, -1, 1, 1, 1),
                                 persistent=False)
            self.register_buffer("std", torch.tensor(cfg.latents_std, device=dev).view(1, -1, 1, 1, 1),
                                 persistent=False)
        else:
            self.channels = int(cfg.latent_channels)
            self.temporal = int(cfg.temporal_compression_ratio)
            self.spatial = 2 ** (len(cfg.block_out_channels) - 1)
            self.factor = float(cfg.scaling_factor)
        self.dtype_ = dtype

    @torch.no_grad()
    def encode(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        x = frames_BCTHW.to(self.vae.device, self.dtype_)
        z = self.vae.encode(x).latent_dist.mode().float()
        if self.kind == "wan":
            return (z - self.mean) / self.std
        return z * self.factor

    @torch.no_grad()
    def decode(self, latent_BCTHW: torch.Tensor) -> torch.Tensor:
        z = latent_BCTHW.to(self.vae.device).float()
        z = z * self.std + self.mean if self.kind == "wan" else z / self.factor
        return self.vae.decode(z.to(self.dtype_)).sample.float().clamp(-1, 1)


class RawFrames(nn.Module):
    """Identity 'encoder': shards of the RGB pixels themselves, what a video VAE trains on
    (`vidscale prepare SRC OUT --set data.encoder=raw`, then a `task: vae` recipe)."""
    channels, temporal, spatial = 3, 1, 1

    def encode(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        return frames_BCTHW.float()

    def decode(self, latent_BCTHW: torch.Tensor) -> torch.Tensor:
        return latent_BCTHW.float().clamp(-1, 1)


def build_latent_encoder(spec: str, channels: int = 4, device: str = "cpu"):
    """'pixel' | 'pixel:C' | 'wan:PATH' | 'cogvideox:PATH' | 'vae:RUN_DIR' | 'raw' -> an encoder."""
    kind, _, arg = spec.partition(":")
    if kind == "pixel":
        return PixelEncoder(int(arg) if arg else channels)
    if kind in ("wan", "cogvideox"):
        return DiffusersVAE(kind, arg, device=device)
    if kind == "vae":  # a VAE trained by vidscale (models/vae.py)
        return VAELatentEncoder(load_vae(arg, device))
    if kind == "raw":
        return RawFrames()
    raise ValueError(f"data.encoder = {spec!r}: expected 'pixel', 'pixel:C', 'wan:PATH', 'cogvideox:PATH', "
                     f"'vae:RUN_DIR' or 'raw'")
