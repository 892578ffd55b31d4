"""The `data` section: the parts declared in data/args.py, one flat set of keys."""
from __future__ import annotations

from dataclasses import dataclass

from vidscale.data.args import LoaderArgs, PrepareArgs


@dataclass
class DataArgs(PrepareArgs, LoaderArgs):
    """The recipe's `data` section. Its keys stay flat (`data.source`, `data.lookahead`,
    `data.synthetic_videos`, `data.clip_frames`, ...); each is declared by the part that reads
    it (data/args.py): `LoaderArgs` for training, which includes the synthetic generator's
    `SyntheticArgs`, and `PrepareArgs` for `vidscale prepare`. Components take their part."""
