"""A causal 3D-convolutional video VAE (the latent space the DiT is trained in).

Video [B, C, T, H, W] in [-1, 1] -> latent [B, z, 1 + (T-1)/ft, H/fs, W/fs] with ft = 4 and
fs = 8 by default (the Wan / CogVideoX layout). Causal in time: every temporal conv pads
the past with copies of the first frame, norms are per frame, and temporal downsampling
keeps the first frame on its own, so latent frame 0 depends on video frame 0 alone and an
image is a 1-frame video (encode(image) == encode(video)[:, :, :1]).

Loss (Kingma & Welling 2014): reconstruction MSE + beta * KL(q(z|x) || N(0, I)), both as
sums over elements so a trainer can normalise by the global pixel count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    in_channels: int = 3
    z_dim: int = 4
    base: int = 64
    mults: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; len(mults) - 1 spatial x2 downsamplings (x8 by default)."""
    temporal_down: tuple[bool, ...] = (False, True, True)
    """Per downsampling: also halve time (two of them: x4)."""
    num_res: int = 1
    groups: int = 8
    """GroupNorm groups (per frame, so normalisation never looks ahead in time)."""
    scale: float = 1.0
    """Latents are (mean - shift) * scale, so the DiT sees roughly unit variance."""
    shift: float = 0.0

    def __post_init__(self):
        self.mults, self.temporal_down = tuple(self.mults), tuple(bool(t) for t in self.temporal_down)
        if len(self.temporal_down) != len(self.mults) - 1:
            raise ValueError(f"vae: temporal_down has {len(self.temporal_down)} entries, expected one per "
                             f"downsampling ({len(self.mults) - 1} = len(mults) - 1)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.mults) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)

    def to_dict(self) -> dict:
        return asdict(self)


def latent_frames(frames: int, temporal_factor: int = 4) -> int:
    """T video frames -> 1 + ceil((T-1)/ft) latent frames (the tail is padded by repetition)."""
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    return 1 + -(-(frames - 1) // temporal_factor)


class CausalConv3d(nn.Module):
    """3D conv that sees only the current and past frames (past padded with the first frame)."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        self.kt = kernel[0]
        self.ph, self.pw = kernel[1] // 2, kernel[2] // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0)

    def forward(self, x_BCTHW):
        # replicate (not zero) borders: a zero border is a strong fake edge on dark frames
        x = F.pad(x_BCTHW, (self.pw, self.pw, self.ph, self.ph, 0, 0), mode="replicate") if self.ph or self.pw else x_BCTHW
        if self.kt > 1:  # replicate the first frame into the past: a still image stays still
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1), x], dim=2)
        return self.conv(x)


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame separately (a norm over time would leak the future)."""

    def forward(self, x_BCTHW):
        B, C, T, H, W = x_BCTHW.shape
        y = super().forward(x_BCTHW.transpose(1, 2).reshape(B * T, C, H, W))
        return y.reshape(B, T, C, H, W).transpose(1, 2)


def _groups(c: int, g: int) -> int:
    return math.gcd(c, g)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameNorm(_groups(cin, groups), cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameNorm(_groups(cout, groups), cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Spatial /2 by a strided conv; optionally time /2 keeping frame 0 alone (1 + 2k -> 1 + k):
    each pair of frames is folded into channels (time-to-depth) and mixed by a 1x1 conv; frame
    0 is folded with itself, so a still video and an image give the same first latent."""

    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv3d(c, c, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.tconv = nn.Conv3d(2 * c, c, 1) if temporal else None

    def forward(self, x):
        x = self.conv(x)
        if self.temporal:
            B, C, T, H, W = x.shape
            assert (T - 1) % 2 == 0, "encode pads the video to 1 + k * temporal_factor frames"
            first = torch.cat([x[:, :, :1], x[:, :, :1]], 1)  # [B, 2C, 1, H, W]
            rest = x[:, :, 1:].reshape(B, C, (T - 1) // 2, 2, H, W).transpose(2, 3)
            rest = rest.reshape(B, 2 * C, (T - 1) // 2, H, W)  # frame pairs in channels
            x = self.tconv(torch.cat([first, rest], 2))
        return x


class Upsample(nn.Module):
    """Inverse of Downsample: time 1 + k -> 1 + 2k (depth-to-time: a 1x1 conv makes two
    frames' channels per latent frame; frame 0 keeps one), then space x2 (nearest + conv)."""

    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(c, c, kernel=(1, 3, 3))
        self.tconv = nn.Conv3d(c, 2 * c, 1) if temporal else None

    def forward(self, x):
        if self.temporal:
            B, C, T, H, W = x.shape
            y = self.tconv(x)  # [B, 2C, T, H, W]
            first = y[:, C:, :1]  # frame 0: one frame (the later of the pair, as in Downsample)
            rest = y[:, :, 1:].reshape(B, 2, C, T - 1, H, W).permute(0, 2, 3, 1, 4, 5)
            x = torch.cat([first, rest.reshape(B, C, 2 * (T - 1), H, W)], 2)
        B, C, T, H, W = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(B * T, C, H, W), scale_factor=2.0, mode="nearest")
        x = x.reshape(B, T, C, 2 * H, 2 * W).transpose(1, 2)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base * m for m in cfg.mults]
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.levels = nn.ModuleList()
        c = chans[0]
        for i, co in enumerate(chans):
            lvl = nn.Module()
            lvl.res = nn.ModuleList([ResBlock(c if j == 0 else co, co, cfg.groups) for j in range(cfg.num_res)])
            c = co
            lvl.down = Downsample(c, cfg.temporal_down[i]) if i < len(chans) - 1 else nn.Identity()
            self.levels.append(lvl)
        self.mid = ResBlock(c, c, cfg.groups)
        self.norm_out = FrameNorm(_groups(c, cfg.groups), c)
        self.conv_out = CausalConv3d(c, 2 * cfg.z_dim)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.levels:
            for r in lvl.res:
                h = r(h)
            h = lvl.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2z, t, h, w]: mean, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base * m for m in cfg.mults][::-1]
        temporal = cfg.temporal_down[::-1]
        c = chans[0]
        self.conv_in = CausalConv3d(cfg.z_dim, c)
        self.mid = ResBlock(c, c, cfg.groups)
        self.levels = nn.ModuleList()
        for i, co in enumerate(chans):
            lvl = nn.Module()
            lvl.res = nn.ModuleList([ResBlock(c if j == 0 else co, co, cfg.groups) for j in range(cfg.num_res + 1)])
            c = co
            lvl.up = Upsample(c, temporal[i]) if i < len(chans) - 1 else nn.Identity()
            self.levels.append(lvl)
        self.norm_out = FrameNorm(_groups(c, cfg.groups), c)
        self.conv_out = CausalConv3d(c, cfg.in_channels)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in self.levels:
            for r in lvl.res:
                h = r(h)
            h = lvl.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoVAE(nn.Module):
    """encode(video [B,C,T,H,W] in [-1,1]) -> latent; decode(latent) -> video; loss(video)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x_BCTHW) -> None:
        if x_BCTHW.dim() != 5 or x_BCTHW.shape[1] != self.cfg.in_channels:
            raise ValueError(f"vae: expected a video [B, {self.cfg.in_channels}, T, H, W], got {tuple(x_BCTHW.shape)}")
        fs = self.cfg.spatial_factor
        if x_BCTHW.shape[-2] % fs or x_BCTHW.shape[-1] % fs:
            raise ValueError(f"vae: frame size {tuple(x_BCTHW.shape[-2:])} is not divisible by the "
                             f"spatial factor {fs}")

    def pad_frames(self, x_BCTHW):
        """Repeat the last frame up to 1 + k * ft frames (any frame count is accepted)."""
        T, ft = x_BCTHW.shape[2], self.cfg.temporal_factor
        need = 1 + (latent_frames(T, ft) - 1) * ft
        if need > T:
            x_BCTHW = torch.cat([x_BCTHW, x_BCTHW[:, :, -1:].expand(-1, -1, need - T, -1, -1)], dim=2)
        return x_BCTHW

    def encode_dist(self, x_BCTHW):
        """Posterior N(mean, exp(logvar)) in raw (unscaled) latent units."""
        self._check(x_BCTHW)
        mean, logvar = self.encoder(self.pad_frames(x_BCTHW)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x_BCTHW, sample: bool = False, generator: torch.Generator | None = None):
        mean, logvar = self.encode_dist(x_BCTHW)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + (0.5 * logvar).exp() * eps
        return (z - self.cfg.shift) * self.cfg.scale

    def decode(self, latent_BZTHW, frames: int | None = None):
        """Latent -> video of 1 + (t-1) * ft frames (or the first `frames` of them)."""
        x = self.decoder(latent_BZTHW / self.cfg.scale + self.cfg.shift)
        return x if frames is None else x[:, :, :frames]

    def forward(self, x_BCTHW, generator: torch.Generator | None = None):
        mean, logvar = self.encode_dist(x_BCTHW)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + (0.5 * logvar).exp() * eps  # reparameterisation trick
        return self.decoder(z)[:, :, :x_BCTHW.shape[2]], mean, logvar

    def loss_terms(self, x_BCTHW, generator: torch.Generator | None = None):
        """(sum of squared reconstruction errors, sum of KL to N(0, I)) over the batch."""
        recon, mean, logvar = self(x_BCTHW, generator)
        rec = (recon.float() - x_BCTHW.float()).pow(2).sum()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum()
        return rec, kl

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv3d,)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                m.weight.mul_(0.7)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # start with a narrow posterior (std ~0.05): a decoder first trained on unit-variance
        # noise learns to ignore its latent, and the KL (small beta) widens it only as needed
        z = self.cfg.z_dim
        self.encoder.conv_out.conv.bias[z:].fill_(-6.0)


def psnr(x, y, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for videos in [-1, 1] (range 2)."""
    mse = (x.float() - y.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


# -- loading a trained VAE as a latent encoder (`data.encoder=vae:RUN_DIR`) ---------------------
VAE_FILES = ("ema.safetensors", "model.safetensors")


def load_vae(path, device: str | torch.device = "cpu") -> VideoVAE:
    """A run directory of a `task: vae` run (its EMA weights when present) or a weights file.

    The file's metadata carries `kind: vae` and the `vae_config` JSON, so nothing else is needed
    (models/ never imports the training code)."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        found = [p / f for f in VAE_FILES if (p / f).is_file()]
        if not found:
            raise ValueError(f"data.encoder = 'vae:{path}': no {' or '.join(VAE_FILES)} there "
                             f"(train it with a 'task: vae' recipe, or pass the exported file)")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"data.encoder = 'vae:{path}': no such run directory or weights file")
    with safe_open(str(p), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("kind") != "vae" or "vae_config" not in meta:
        raise ValueError(f"{p}: not a vidscale VAE (kind={meta.get('kind')!r}); expected the weights of a "
                         f"'task: vae' run")
    model = VideoVAE(VAEConfig(**json.loads(meta["vae_config"])))
    model.load_state_dict(load_file(str(p)))
    return model.to(device).eval()


class VAELatentEncoder(nn.Module):
    """The latent-encoder interface (models/latent.py) over a trained VideoVAE: the posterior
    mean (deterministic preparation), frames B x 3 x T x H x W in [-1, 1]."""

    def __init__(self, vae: VideoVAE):
        super().__init__()
        self.vae = vae.eval()
        self.channels = vae.cfg.z_dim
        self.temporal = vae.cfg.temporal_factor
        self.spatial = vae.cfg.spatial_factor

    @torch.no_grad()
    def encode(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        dev = next(self.vae.parameters()).device
        return self.vae.encode(frames_BCTHW.float().to(dev)).float()

    @torch.no_grad()
    def decode(self, latent_BCTHW: torch.Tensor) -> torch.Tensor:
        dev = next(self.vae.parameters()).device
        return self.vae.decode(latent_BCTHW.float().to(dev)).float().clamp(-1, 1)
