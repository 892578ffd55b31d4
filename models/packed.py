"""The packed batch: several videos of different sizes in one flat token sequence.

NaViT-style packing puts whole videos end to end. The model sees one token sequence
`[L, P]` (P = C * pt * ph * pw values per patch) plus the metadata below, which tells
each attention where one video ends and the next begins. Under sequence parallelism a
rank holds a contiguous slice of the tokens and of the per-token fields, while the
per-video fields (boundaries, timesteps, text) stay whole on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PackedMeta:
    """Per-batch metadata of a packed sequence. Host-side tuples avoid device syncs."""

    bounds: tuple[int, ...]
    """Global token boundaries of the videos, like `cu_seqlens` (len = videos + 1)."""
    seq_len: int
    """Global packed length including padding (>= bounds[-1])."""
    coords: torch.Tensor
    """[L_local, 3] long: (t, y, x) patch coordinates of this rank's tokens."""
    seg_ids: torch.Tensor
    """[L_local] long: video index of each local token; padding tokens get `num_videos`."""
    text: torch.Tensor
    """[Lt, Dt] text-encoder tokens of all videos, packed."""
    text_bounds: tuple[int, ...]
    """Boundaries of each video's text tokens in `text` (len = videos + 1)."""
    grid: tuple[tuple[int, int, int], ...]
    """Per video (T, H, W) in patches, for unpatchify."""
    offset: int = 0
    """Global index of this rank's first token (0 without sequence parallelism)."""
    names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_videos(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_real(self) -> int:
        return self.bounds[-1]

    @property
    def local_len(self) -> int:
        return int(self.seg_ids.shape[0])

    def segments(self) -> list[tuple[int, int]]:
        """Global (start, end) of every self-attention segment: each video, then padding."""
        segs = [(self.bounds[i], self.bounds[i + 1]) for i in range(self.num_videos)]
        if self.seq_len > self.bounds[-1]:
            segs.append((self.bounds[-1], self.seq_len))
        return [s for s in segs if s[1] > s[0]]

    cu: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """`cu_seqlens()` on the training device, made once per batch by `to()`."""

    def cu_seqlens(self, device=None) -> torch.Tensor:
        """int32 cumulative lengths over all segments (padding included), for varlen kernels."""
        if self.cu is not None and (device is None or self.cu.device == torch.device(device)):
            return self.cu
        segs = self.segments()
        cu = [0] + [e for _, e in segs]
        return torch.tensor(cu, dtype=torch.int32, device=device)

    @property
    def max_segment(self) -> int:
        return max(e - s for s, e in self.segments())

    def real_mask(self) -> torch.Tensor:
        """[L_local] bool: True for real (non-padding) tokens."""
        return self.seg_ids < self.num_videos

    def to(self, device) -> "PackedMeta":
        """The tensors on `device` (non-blocking from pinned host memory), with cu_seqlens built
        there once for every attention layer of the batch."""
        device = torch.device(device)
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else \
            (lambda t: t.to(device))
        cu = self.cu_seqlens().to(device) if device.type != "cpu" else None
        return replace(self, coords=move(self.coords), seg_ids=move(self.seg_ids), text=move(self.text), cu=cu)

    def shard(self, rank: int, world: int) -> "PackedMeta":
        """The contiguous 1/world slice of the per-token fields (seq_len must divide)."""
        assert self.offset == 0 and self.local_len == self.seq_len, "shard a full batch only"
        if self.seq_len % world:
            raise ValueError(f"packed length {self.seq_len} is not divisible by sp={world}")
        n = self.seq_len // world
        sl = slice(rank * n, (rank + 1) * n)
        return replace(self, coords=self.coords[sl], seg_ids=self.seg_ids[sl], offset=rank * n)


def seg_ids_from_bounds(bounds: tuple[int, ...], seq_len: int) -> torch.Tensor:
    lengths = torch.tensor([bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)] +
                           [seq_len - bounds[-1]])
    return torch.repeat_interleave(torch.arange(len(bounds)), lengths)


def patch_coords(T: int, H: int, W: int) -> torch.Tensor:
    """[T*H*W, 3] (t, y, x) in patch units, t-major like `patchify`."""
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def patchify(latent_CTHW: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """C x T x H x W -> [T/pt * H/ph * W/pw, C*pt*ph*pw] tokens, t-major then y then x."""
    C, T, H, W = latent_CTHW.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent of shape {tuple(latent_CTHW.shape)} is not divisible by patch {patch}")
    x = latent_CTHW.reshape(C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(1, 3, 5, 0, 2, 4, 6)  # T' H' W' C pt ph pw
    return x.reshape((T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(tokens_NP: torch.Tensor, grid: tuple[int, int, int], channels: int,
               patch: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: [T'*H'*W', C*pt*ph*pw] -> C x T x H x W."""
    Tg, Hg, Wg = grid
    pt, ph, pw = patch
    x = tokens_NP.reshape(Tg, Hg, Wg, channels, pt, ph, pw)
    x = x.permute(3, 0, 4, 1, 5, 2, 6)  # C T' pt H' ph W' pw
    return x.reshape(channels, Tg * pt, Hg * ph, Wg * pw)


def pack(latents: list[torch.Tensor], texts: list[torch.Tensor], patch: tuple[int, int, int],
         pad_to: int | None = None, multiple: int = 1, names: tuple[str, ...] = ()
         ) -> tuple[torch.Tensor, PackedMeta]:
    """Pack C x T x H x W latents and their [Lt_i, Dt] text tokens into (tokens, meta).

    `pad_to` pads to a fixed token budget; `multiple` pads up to a multiple (what sequence
    parallelism needs). Padding tokens are zeros and form their own attention segment.
    """
    toks, coords, bounds, grid = [], [], [0], []
    for lat in latents:
        _, T, H, W = lat.shape
        g = (T // patch[0], H // patch[1], W // patch[2])
        toks.append(patchify(lat, patch))
        coords.append(patch_coords(*g))
        bounds.append(bounds[-1] + toks[-1].shape[0])
        grid.append(g)
    n = bounds[-1]
    seq_len = n if pad_to is None else pad_to
    if seq_len < n:
        raise ValueError(f"packed videos hold {n} tokens, more than the budget {seq_len}")
    seq_len = -(-seq_len // multiple) * multiple
    tokens = torch.cat(toks, 0)
    pad = seq_len - n
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])], 0)
        coords.append(torch.zeros(pad, 3, dtype=torch.long))
    tb = [0]
    for t in texts:
        tb.append(tb[-1] + t.shape[0])
    text = torch.cat(texts, 0) if texts else torch.zeros(0, 1)
    meta = PackedMeta(bounds=tuple(bounds), seq_len=seq_len, coords=torch.cat(coords, 0),
                      seg_ids=seg_ids_from_bounds(tuple(bounds), seq_len), text=text,
                      text_bounds=tuple(tb), grid=tuple(grid), names=tuple(names))
    return tokens, meta


def unpack(tokens_LP: torch.Tensor, meta: PackedMeta, channels: int, patch: tuple[int, int, int]
           ) -> list[torch.Tensor]:
    """Full (unsharded) packed tokens -> list of C x T x H x W latents."""
    return [unpatchify(tokens_LP[meta.bounds[i]:meta.bounds[i + 1]], meta.grid[i], channels, patch)
            for i in range(meta.num_videos)]
