"""Shard round trip, the latent encoders (pixel stand-in, a diffusers Wan VAE from a local
folder) and the packaged MiniLM text encoder."""
import tarfile

import pytest
import torch

from vidscale.data.shards import ShardSource, ShardWriter, read_index
from vidscale.models.latent import DiffusersVAE, PixelEncoder, build_latent_encoder


def test_shard_round_trip_is_exact_in_bf16(tmp_path):
    g = torch.Generator().manual_seed(0)
    written = []
    w = ShardWriter(tmp_path, max_bytes=4000, patch=(1, 2, 2))
    for i in range(9):
        lat, txt = torch.randn(4, 1 + i % 3, 4, 6, generator=g), torch.randn(3 + i, 16, generator=g)
        w.write(lat, txt, {"caption": f"clip {i}", "fps": 8.0, "frame_range": [0, 5]})
        written.append((lat.bfloat16(), txt.bfloat16()))
    w.close(channels=4, text_dim=16)
    index = read_index(tmp_path)
    assert index["samples"] == 9 and len(index["shards"]) > 1  # rolled over
    assert sum(s["samples"] for s in index["shards"]) == 9
    assert index["shards"][0]["tokens"][0] == 1 * 2 * 3
    names = tarfile.open(tmp_path / index["shards"][0]["name"]).getnames()
    assert names[:3] == ["000000000.json", "000000000.safetensors", "000000000.txt"]
    model = {"patch": (1, 2, 2), "channels": 4, "text_dim": 16}
    src = ShardSource(tmp_path, seed=0, tokens_per_batch=1024, **model)
    got = {i: s for i, s, _ in src.stream(list(range(9)))}
    for i, (lat, txt) in enumerate(written):
        glat, gtxt, meta = got[i]
        assert glat.dtype == torch.bfloat16 and torch.equal(glat, lat) and torch.equal(gtxt, txt)
        assert meta["caption"] == f"clip {i}" and meta["shape"] == list(lat.shape) and meta["fps"] == 8.0
    with pytest.raises(ValueError, match="model.in_channels=4"):
        ShardSource(tmp_path, seed=0, tokens_per_batch=1024, **{**model, "channels": 16})
    # the first latent, 1 x 4 x 6, holds 6 tokens
    with pytest.raises(ValueError, match=r"shard-\d+.tar:\d+' has 6 tokens.*tokens_per_batch=4"):
        ShardSource(tmp_path, seed=0, tokens_per_batch=4, **model)


def smooth_video(T=9, H=32, W=48):
    t = torch.linspace(0, 1, T)[:, None, None]
    y = torch.linspace(-1, 1, H)[None, :, None]
    x = torch.linspace(-1, 1, W)[None, None, :]
    chans = [0.6 * y + 0.2 * t + 0 * x, 0.5 * x * torch.cos(y) + 0 * t, 0.3 * (x * y) - 0.2 * t]
    return torch.stack([c.expand(T, H, W) for c in chans])[None].clamp(-1, 1)


def test_pixel_encoder_compresses_like_a_causal_vae_and_roughly_inverts():
    enc = PixelEncoder(channels=4)
    x = smooth_video(T=9)
    z = enc.encode(x)
    assert z.shape == (1, 4, 3, 4, 6)  # 1 + (9 - 1) / 4 latent frames, 8x spatial
    assert torch.equal(z, enc.encode(x))
    y = enc.decode(z)
    assert y.shape == x.shape
    assert (y - x).pow(2).mean().sqrt() < 0.1  # smooth content survives
    noise = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    assert (enc.decode(enc.encode(noise)) - noise).pow(2).mean().sqrt() > 0.3  # detail does not: a stand-in
    assert build_latent_encoder("pixel:8").channels == 8


def test_diffusers_wan_vae_from_a_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the [vae] extra is not installed")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.5] * 4,
                                     latents_std=[2.0] * 4)
    vae.save_pretrained(tmp_path / "wan")
    enc = build_latent_encoder(f"wan:{tmp_path / 'wan'}")
    assert isinstance(enc, DiffusersVAE) and (enc.channels, enc.temporal, enc.spatial) == (4, 4, 8)
    x = smooth_video(T=9, H=32, W=32)
    z = enc.encode(x)
    assert z.shape == (1, 4, 3, 4, 4)
    raw = vae.encode(x).latent_dist.mode()
    assert torch.allclose(z, (raw - 0.5) / 2.0, atol=1e-5)  # normalised with the config's mean/std
    assert enc.decode(z).shape == (1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="not found"):
        build_latent_encoder(f"wan:{tmp_path / 'missing'}")


def test_diffusers_cogvideox_vae_from_a_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the [vae] extra is not installed")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                                           norm_num_groups=4, temporal_compression_ratio=4, scaling_factor=0.7)
    vae.save_pretrained(tmp_path / "cog")
    enc = build_latent_encoder(f"cogvideox:{tmp_path / 'cog'}")
    assert (enc.channels, enc.temporal, enc.spatial) == (4, 4, 8)
    x = smooth_video(T=9, H=32, W=32)
    z = enc.encode(x)
    assert z.shape == (1, 4, 3, 4, 4)
    assert torch.allclose(z, vae.encode(x).latent_dist.mode() * 0.7, atol=1e-5)


def test_local_t5_folder_loads_as_an_encoder_only_model(tmp_path):
    import transformers as tf

    from vidscale.models.text import TextEncoder, minilm_path
    tf.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(tmp_path / "t5")
    torch.manual_seed(0)
    t5 = tf.T5EncoderModel(tf.T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    t5.save_pretrained(tmp_path / "t5")
    enc = TextEncoder(str(tmp_path / "t5"))
    assert isinstance(enc.model, tf.T5EncoderModel) and enc.dim == 32
    (h,) = enc.encode(["a blue square moving up"])
    ids = enc.tokenizer(["a blue square moving up"], return_tensors="pt")["input_ids"]
    assert torch.allclose(h, t5.eval()(input_ids=ids).last_hidden_state[0], atol=1e-5)
    with pytest.raises(ValueError, match="no config.json"):
        TextEncoder(str(tmp_path / "nothing"))


def test_packaged_minilm_encodes_captions_offline():
    from vidscale.models.text import TextEncoder

    enc = TextEncoder("minilm")
    a, b, c = enc.encode(["a red circle moving right", "a red disc moving to the right",
                          "quarterly earnings of a bank"])
    assert enc.dim == 384 and a.shape == (7, 384) and b.shape[1] == c.shape[1] == 384  # [CLS] 5 words [SEP]
    cos = torch.nn.functional.cosine_similarity
    assert cos(a.mean(0), b.mean(0), dim=0) > cos(a.mean(0), c.mean(0), dim=0) + 0.2
    assert torch.allclose(enc.encode(["a red circle moving right"])[0], a, atol=1e-4)  # padding stripped
