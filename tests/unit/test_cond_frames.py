"""Image-to-video conditioning modes (`objective.cond_frames`, `objective.cond_mode`): in training the
chosen latent frames (leading, trailing, or both ends) are given clean and left out of the loss; in
sampling the given first / last frames stay fixed."""
import pytest
import torch

from vidscale.models.diffusion import make_objective
from vidscale.models.packed import pack, unpatchify
from vidscale.scaling.config import COND_MODES, RecipeError, load_config
from vidscale.scaling.inference.sample import sample_latent
from vidscale.scaling.objective import clean_frames_mask

from conftest import DEBUG  # noqa: E402
from test_sample import tiny_model  # noqa: E402

C = 4


def batch(patch):
    """Three videos of 1, 4 and 7 latent frames (whole temporal patches), packed with padding."""
    Ts = (patch[0], 4, 7) if patch[0] == 1 else (2, 4, 8)
    lats = [torch.randn(C, T, 4, 4) for T in Ts]
    return pack(lats, [torch.randn(2, 8)] * 3, patch, multiple=64)


def frames_of(mask_LP, meta, patch):
    """Per video: the set of latent frames the mask covers (each wholly or not at all)."""
    out = []
    for i, g in enumerate(meta.grid):
        m = unpatchify(mask_LP[meta.bounds[i]:meta.bounds[i + 1]].float(), g, C, patch)  # C x T x H x W
        per = m.flatten(2).transpose(0, 1).reshape(m.shape[1], -1)  # T x (C H W)
        assert ((per == 0).all(1) | (per == 1).all(1)).all(), "a frame is partly clean"
        out.append({t for t in range(m.shape[1]) if per[t].all()})
    return out


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_clean_frames_sit_where_the_mode_puts_them(patch):
    tokens, meta = batch(patch)
    assert meta.seq_len > meta.num_real  # padding present: never clean
    for seed in range(6):
        ks = torch.randint(0, 3 + 1, (meta.num_videos,), generator=torch.Generator().manual_seed(seed))
        got = {mode: clean_frames_mask(meta, 3, C, patch, torch.Generator().manual_seed(seed), mode)
               for mode in COND_MODES}
        for mode, mask in got.items():
            assert not mask[meta.num_real:].any()
            for (T, _, _), k, frames in zip(meta.grid, ks.tolist(), frames_of(mask, meta, patch)):
                T *= patch[0]
                if mode == "first_last":
                    k = min(k, (T - 1) // 2)
                    want = set(range(k)) | set(range(T - k, T))
                else:
                    k = min(k, T - 1)
                    want = set(range(k)) if mode == "first" else set(range(T - k, T))
                assert frames == want, (mode, T, k, frames)
                assert len(frames) < T  # something is always left to denoise
    assert clean_frames_mask(meta, 0, C, patch, torch.Generator(), "last") is None


def test_first_mode_draws_what_leading_frames_drew_before():
    """`first` (the default) is the old behaviour: the k leading frames, k from the same draw."""
    patch = (1, 2, 2)
    _, meta = batch(patch)
    for seed in range(4):
        mask = clean_frames_mask(meta, 2, C, patch, torch.Generator().manual_seed(seed))
        ks = torch.randint(0, 3, (meta.num_videos,), generator=torch.Generator().manual_seed(seed))
        want = [set(range(min(int(k), T - 1))) for (T, _, _), k in zip(meta.grid, ks)]
        assert frames_of(mask, meta, patch) == want


@pytest.mark.parametrize("name", ["flow", "ddpm"])
@pytest.mark.parametrize("mode", COND_MODES)
def test_clean_frames_are_model_inputs_and_out_of_the_loss(name, mode):
    patch = (1, 2, 2)
    x0, meta = batch(patch)
    obj = make_objective(name, **({"num_steps": 100} if name == "ddpm" else {}))
    g = torch.Generator().manual_seed(3)
    t_V, noise = obj.sample_t(meta.num_videos, g), torch.randn(x0.shape, generator=g)
    clean = clean_frames_mask(meta, 3, C, patch, torch.Generator().manual_seed(1), mode)
    assert clean.any() and not clean.all()
    seen, pred = [], torch.randn(x0.shape, generator=g)

    def model_fn(x_t, t):
        seen.append(x_t)
        return pred

    base = obj.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean)
    assert torch.equal(seen[0][clean], x0[clean])  # given clean
    assert not torch.equal(seen[0][~clean], x0[~clean])  # the rest noised
    pred = pred + 100.0 * clean  # whatever the model says there does not count
    assert torch.equal(obj.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean), base)
    pred = pred + 1.0 * ~clean  # elsewhere it does
    assert not torch.equal(obj.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean), base)


@pytest.mark.parametrize("name", ["flow", "ddpm"])
def test_sampling_keeps_the_given_last_and_first_last_frames(name):
    model, shape, patch = tiny_model(), (4, 4, 4, 4), (1, 2, 2)
    obj = make_objective(name, **({"num_steps": 50} if name == "ddpm" else {}))
    first, last, text = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(3, 8)
    end = sample_latent(model, obj, text, shape, patch, steps=4, cfg_scale=2.0, last_CjHW=last)
    assert torch.equal(end[:, -1:], last) and not torch.equal(end[:, :1], last)
    both = sample_latent(model, obj, text, shape, patch, steps=4, cfg_scale=2.0, cond_CkHW=first, last_CjHW=last)
    assert torch.equal(both[:, :1], first) and torch.equal(both[:, -1:], last)
    free = sample_latent(model, obj, text, shape, patch, steps=4, cfg_scale=2.0)
    assert not torch.allclose(both[:, 1:-1], free[:, 1:-1])  # the middle frames see both ends
    loop = sample_latent(model, obj, text, shape, patch, steps=4, cond_CkHW=first, last_CjHW=first)
    assert torch.equal(loop[:, 0], loop[:, -1])
    with pytest.raises(ValueError, match="overlap"):
        sample_latent(model, obj, text, (4, 1, 4, 4), patch, steps=2, cond_CkHW=first, last_CjHW=last)


def test_cond_mode_is_checked():
    assert load_config(DEBUG, ["objective.cond_mode=first_last"]).objective.cond_mode == "first_last"
    with pytest.raises(RecipeError, match="objective.cond_mode"):
        load_config(DEBUG, ["objective.cond_mode=middle"])


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_clean_frames_follow_the_kept_tokens_under_token_dropping(patch):
    """With data.drop_tokens a video holds a random subset of its patches: each kept token is
    clean exactly where the same token of the undropped batch is."""
    from vidscale.data.packing import pack_dropped
    Ts = (2, 4, 8)
    lats = [torch.randn(C, T, 4, 6) for T in Ts]
    texts = [torch.randn(2, 8)] * 3
    full_tokens, full_meta = pack(lats, texts, patch, multiple=64)
    keep = [n * 5 // 8 for n in (b - a for a, b in zip(full_meta.bounds, full_meta.bounds[1:]))]
    tokens, meta = pack_dropped(lats, texts, patch, keep=keep, gen=torch.Generator().manual_seed(7), multiple=64)
    assert meta.num_real < full_meta.num_real
    # the reference row of each kept token: where its values sit in the undropped batch
    rows = torch.cdist(tokens[:meta.num_real], full_tokens[:full_meta.num_real]).argmin(1)
    assert torch.equal(full_tokens[rows], tokens[:meta.num_real])
    for mode in COND_MODES:
        for seed in range(4):
            want = clean_frames_mask(full_meta, 3, C, patch, torch.Generator().manual_seed(seed), mode)
            got = clean_frames_mask(meta, 3, C, patch, torch.Generator().manual_seed(seed), mode)
            assert got.shape == tokens.shape and not got[meta.num_real:].any()
            assert torch.equal(got[:meta.num_real], want[rows]), (mode, seed)
            assert want.any()
