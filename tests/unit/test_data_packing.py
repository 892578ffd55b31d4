"""NaViT packing: budgets respected, every video exactly once, deterministic, >= 0.99 full on
a mixed-resolution distribution, clear errors for videos longer than the budget."""
import random

import pytest
import torch

from vidscale.data.packing import Item, Packer, drop_tokens, pack_all, pack_dropped
from vidscale.models.packed import pack
from vidscale.scaling.bench.packing import bucket_efficiency, pad_efficiency, video_distribution


@pytest.mark.parametrize("budget,lookahead", [(100, 1), (100, 8), (1000, 64), (37, 5)])
def test_packer_never_exceeds_the_budget_and_keeps_every_video(budget, lookahead):
    rng = random.Random(budget + lookahead)
    items = [Item(i, rng.randint(1, budget)) for i in range(500)]
    bins = list(pack_all(items, budget, lookahead))
    assert all(0 < b.used <= budget and b.used == sum(i.tokens for i in b.items) for b in bins)
    assert sorted(i.key for b in bins for i in b.items) == list(range(500))
    again = list(pack_all(items, budget, lookahead))
    assert [[i.key for i in b.items] for b in bins] == [[i.key for i in b.items] for b in again]


def test_packing_efficiency_on_mixed_resolutions_beats_padding_and_buckets():
    videos = video_distribution(2000, seed=1)
    tokens = [t for _, t in videos]
    bins = list(pack_all([Item(i, t) for i, t in enumerate(tokens)], 32768, 64))
    eff = sum(tokens) / (len(bins) * 32768)
    assert eff >= 0.99
    assert pad_efficiency(tokens, 32768) < eff and bucket_efficiency(videos, 32768) < eff


def test_video_longer_than_the_budget_is_an_error_naming_it():
    p = Packer(100, lookahead=8)
    with pytest.raises(ValueError, match=r"'clip-7' has 101 tokens.*tokens_per_batch=100"):
        p.push(Item("clip-7", 101))


def test_token_dropping_keeps_real_coordinates():
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 1, 2, 2, generator=g)]
    texts = [torch.randn(3, 8), torch.randn(2, 8)]
    keep = [drop_tokens(8, 0.5, 4), drop_tokens(1, 0.5, 4)]
    assert keep == [4, 1]
    tokens, meta = pack_dropped(lats, texts, (1, 2, 2), keep, g, pad_to=5, multiple=4)
    full, fmeta = pack(lats, texts, (1, 2, 2))
    assert meta.bounds == (0, 4, 5) and meta.seq_len == 8 and tokens.shape == (8, 16)
    for row, c in zip(tokens[:4], meta.coords[:4]):  # each kept token is the full video's token at c
        j = int(c[0] * 4 + c[1] * 2 + c[2])
        assert torch.equal(row, full[j]) and torch.equal(fmeta.coords[j], c)
    assert torch.equal(tokens[4], full[8]) and not tokens[5:].any()


def test_packing_without_dropping_equals_models_pack():
    g = torch.Generator().manual_seed(1)
    lats = [torch.randn(4, *shape, generator=g) for shape in ((2, 4, 6), (1, 2, 2), (3, 2, 4))]
    texts = [torch.randn(3, 8), torch.randn(1, 8), torch.randn(5, 8)]
    for multiple in (1, 4, 7):
        a_tok, a = pack_dropped(lats, texts, (1, 2, 2), multiple=multiple, names=("x", "y", "z"))
        b_tok, b = pack(lats, texts, (1, 2, 2), multiple=multiple, names=("x", "y", "z"))
        assert torch.equal(a_tok, b_tok) and a.bounds == b.bounds and a.seq_len == b.seq_len
        for f in ("coords", "seg_ids", "text"):
            assert torch.equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype, f
        assert (a.text_bounds, a.grid, a.names) == (b.text_bounds, b.grid, b.names)
