"""The parts of a recipe's `data` section, each declared by what reads it.

`scaling/config/data.py` combines them into `DataArgs` by inheritance, so recipe keys stay flat
(`data.source`, `data.lookahead`, `data.clip_frames`, ...). They live here, below the
engine, so the data components can name the part they take without importing `scaling`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyntheticArgs:
    """The synthetic latent generator (data/synthetic.py), used when `data.source=synthetic`."""
    synthetic_videos: int = 256
    """Videos in one synthetic epoch."""
    frames: list[int] = field(default_factory=lambda: [1, 4])
    """Synthetic latent frame range [min, max]."""
    sizes: list[list[int]] = field(default_factory=lambda: [[8, 8], [8, 12], [12, 8], [16, 16], [8, 16]])
    """Synthetic latent (H, W) choices."""
    text_tokens: list[int] = field(default_factory=lambda: [4, 16])
    """Synthetic caption length range [min, max]."""


@dataclass
class SourceArgs:
    """One prepared shard set of a mixture (`data.sources`)."""
    path: str = ""
    """A directory of prepared shards (`vidscale prepare`)."""
    weight: float = 1.0
    """Its share of the training tokens, relative to the other sources' weights."""
    name: str = ""
    """How metrics.jsonl and the consumed records name it (default: the folder's name)."""


def source_name(src: SourceArgs) -> str:
    """`name`, or the last part of `path` (what `source_share` and the loader state call it)."""
    return src.name or src.path.rstrip("/").rsplit("/", 1)[-1] or src.path


def shard_sets(data) -> list[tuple[str, str, float, str]]:
    """The prepared shard sets a recipe's `data` section reads, as (path, recipe key, weight,
    name): each of `data.sources`, or the one `data.source` (none for synthetic data)."""
    if data.sources:
        return [(s.path, f"data.sources[{j}].path", s.weight, source_name(s)) for j, s in enumerate(data.sources)]
    return [] if data.source == "synthetic" else [(data.source, "data.source", 1.0, "")]


@dataclass
class LoaderArgs(SyntheticArgs):
    """The training loader (data/loader.py): where samples come from (prepared shards, or the
    synthetic generator whose keys it inherits) and how they are shuffled, packed and read."""
    source: str = "synthetic"
    """'synthetic' (generated latents) or a directory of prepared shards (`vidscale prepare`)."""
    sources: list[SourceArgs] = field(default_factory=list)
    """A mixture instead of `source`: [{path, weight, name}], prepared shard sets drawn by weight
    as shares of the training TOKENS (a batch comes from one source; data/mixture.py). Each
    source keeps the loader's guarantees on its own: every sample once per epoch of that
    source, exact resume, remapping to a new dp size."""
    lookahead: int = 64
    """Videos buffered by the packer (first-fit-decreasing over this window)."""
    shuffle_buffer: int = 256
    """Samples shuffled together before packing, in consecutive windows of a rank's read order
    (0 or 1 = off). The reader holds about shuffle_buffer + lookahead decoded samples."""
    workers: int = 0
    """Loader worker processes (0 reads in the training process)."""
    on_error: str = "skip"
    """Undecodable sample or truncated shard: 'skip' (count and go on) or 'fail'."""
    drop_tokens: float = 0.0
    """NaViT token dropping: fraction of tokens of long videos dropped at random (0 = off)."""
    drop_min_tokens: int = 1024
    """Only videos with at least this many tokens get tokens dropped."""
    record_consumed: bool = False
    """Each data-parallel rank appends the names of the samples it trained on to
    RUN_DIR/consumed/dpNNNNN.jsonl, one {"step", "epoch", "keys"} line per step and epoch
    (records past a resumed checkpoint's step are dropped on resume, like metrics.jsonl's)."""


@dataclass
class PrepareArgs:
    """Turning videos into shards (`vidscale prepare`, data/prepare.py)."""
    encoder: str = "pixel"
    """Latent encoder: 'pixel' (built-in stand-in), 'wan:PATH', 'cogvideox:PATH', 'vae:RUN_DIR'."""
    text_encoder: str = "minilm"
    """Text encoder: 'minilm' (packaged all-MiniLM-L6-v2) or a local T5/UMT5/CLIP path."""
    clip_frames: int = 17
    """Frames per clip (1 + 4k suits 4x temporal compression)."""
    fps: float = 0.0
    """Resample to this frame rate (0 keeps the source rate)."""
    max_area: int = 0
    """Resize so H*W <= max_area keeping aspect (0 keeps native size)."""
    max_clips: int = 4
    """Clips cut from one long video at most (0 = no limit)."""
    shard_max_bytes: int = 64_000_000
    """A shard rolls over to the next once it passes this size (so it may exceed it by one sample)."""
    captions: str = ""
    """Caption sidecar (jsonl or csv with 'file' and 'caption'); default: a .txt beside each video."""
