"""The causal video VAE: shapes, causality (an image is a 1-frame video), overfitting, the
`task: vae` training path in one process and `data.encoder=vae:RUN_DIR`."""
import json

import pytest
import torch

from vidscale.data.shapes import render
from vidscale.models.latent import build_latent_encoder
from vidscale.models.vae import VAEConfig, VideoVAE, latent_frames, psnr
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import train

from conftest import QUIET, ROOT  # noqa: E402


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = VAEConfig(**{"base": 8, "mults": (1, 2, 2, 2), "temporal_down": (False, True, True), **kw})
    m = VideoVAE(cfg)
    m.init_weights()
    return m.eval()


def test_default_layout_is_x4_time_x8_space():
    cfg = VAEConfig()
    assert cfg.temporal_factor == 4 and cfg.spatial_factor == 8
    assert [latent_frames(t) for t in (1, 5, 17, 33)] == [1, 2, 5, 9]


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 9, 13])
def test_encode_decode_shapes_for_any_frame_count(T):
    m = tiny()
    x = torch.rand(2, 3, T, 16, 24) * 2 - 1
    with torch.no_grad():
        z = m.encode(x)
        assert z.shape == (2, 4, 1 + -(-(T - 1) // 4), 2, 3)
        y = m.decode(z)
        assert y.shape == (2, 3, 1 + 4 * (z.shape[2] - 1), 16, 24)  # odd counts: padded to 1 + 4k
        assert m.decode(z, frames=T).shape == x.shape


def test_causal_an_image_is_a_one_frame_video():
    m = tiny()
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        z, z1 = m.encode(x), m.encode(x[:, :, :1])
        # equal up to float rounding (convolutions over other lengths sum in another order)
        torch.testing.assert_close(z[:, :, :1], z1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.decode(z)[:, :, :1], m.decode(z[:, :, :1]), atol=1e-5, rtol=1e-5)
        # later frames never change earlier latents
        x2 = x.clone()
        x2[:, :, 5:] = 0
        torch.testing.assert_close(m.encode(x2)[:, :, :2], z[:, :, :2], atol=1e-5, rtol=1e-5)


def test_bad_sizes_are_one_line_errors():
    m = tiny()
    with pytest.raises(ValueError, match="divisible by the spatial factor 8"):
        m.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="expected a video"):
        m.encode(torch.zeros(3, 5, 16, 16))


def test_kl_and_reconstruction_terms():
    m = tiny()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    rec, kl = m.loss_terms(x, torch.Generator().manual_seed(0))
    assert rec > 0 and kl >= 0
    rec.backward()
    assert all(p.grad is not None for p in m.decoder.parameters())


# A 16-channel VAE (x4 time, x4 space) on one 9-frame 16x16 clip of a moving circle: PSNR
# starts near 13 dB; after 150 Adam steps it is above 20 dB (measured 23.4).
def test_vae_overfits_a_tiny_clip():
    torch.manual_seed(0)
    m = VideoVAE(VAEConfig(base=16, mults=(1, 2, 2), temporal_down=(True, True)))
    m.init_weights()
    f = render("circle", "red", "blue", "right", 16, 16, 9, seed=3)
    x = torch.from_numpy(f).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        before = psnr(m.decode(m.encode(x), 9), x)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for s in range(150):
        rec, kl = m.loss_terms(x, torch.Generator().manual_seed(s))
        loss = (rec + 1e-6 * kl) / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = psnr(m.decode(m.encode(x), 9), x)
    assert before < 16 and after > 20, (before, after)


def test_vae_task_trains_reports_psnr_and_serves_as_latent_encoder(tmp_path):
    """`task: vae` through the real train loop; the run is then a `vae:RUN_DIR` encoder."""
    run = tmp_path / "vae"
    cfg = load_config(ROOT / "recipes/vae-debug.yaml", [f"train.run_dir={run}", "train.steps=30", "train.val_every=10",
                                                          "logging.every=10", *QUIET])
    train(cfg)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    psnrs = [r["val_psnr"] for r in recs if "val_psnr" in r]
    # 30 steps teach little about unseen clips: the PSNR is reported, the training loss falls
    assert len(psnrs) == 3 and all(5 < p < 60 for p in psnrs), psnrs
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"]
    enc = build_latent_encoder(f"vae:{run}")
    assert (enc.channels, enc.temporal, enc.spatial) == (4, 4, 8)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = enc.encode(x)
    assert z.shape == (1, 4, 3, 4, 4) and enc.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="vae:"):
        build_latent_encoder(f"vae:{tmp_path / 'nothing'}")


def test_export_of_a_vae_run_is_a_vae_file(tmp_path, capsys):
    """`vidscale export` of a `task: vae` run writes kind vae and its vae_config (it wrote kind
    dit without one: neither load_vae nor load_weights could use the file); load_vae rebuilds
    the run's own final weights from it."""
    from safetensors.torch import load_file
    from vidscale.models.vae import load_vae
    from vidscale.scaling.cli.main import main
    run = tmp_path / "vae"
    train(load_config(ROOT / "recipes/vae-debug.yaml", [f"train.run_dir={run}", "train.steps=2", "train.val_every=0",
                                                          "vae.val_clips=1", *QUIET]))
    out = tmp_path / "vae.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    model = load_vae(out)
    ref = load_file(str(run / "model.safetensors"))
    got = model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
