"""Consolidated weights as self-describing safetensors files.

A weights file holds a plain state dict (no pickles) and, in its metadata, the resolved
recipe (`config`) and what it is (`kind`: dit or vae; `ema`: whether these are the EMA
weights), so `load_weights(path)` rebuilds the model with nothing else at hand:

    save_weights(model.state_dict(), "model.safetensors", cfg, ema=False)
    model, cfg = load_weights("model.safetensors")

`train()` writes RUN_DIR/model.safetensors (and RUN_DIR/ema.safetensors when the EMA is on)
at the end of a run; `vidscale export` and `vidscale sample` read the same format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vidscale.models.dit import VideoDiT
from vidscale.scaling.checkpoint.storage import replace_durably
from vidscale.scaling.config import Config, load_config_text, model_config, to_yaml

MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"


def save_weights(state: dict[str, torch.Tensor], path: str | Path, cfg: Config, kind: str = "dit",
                 ema: bool = False, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "vidscale", "kind": kind, "ema": json.dumps(bool(ema)), "config": to_yaml(cfg)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    replace_durably(tmp, path)  # a reader never sees half a file, nor does a node after a crash
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """A weights file's metadata alone (its header: no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a corrupt header or truncated file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def is_ema(meta: dict[str, str]) -> bool:
    """Whether a file's metadata says it holds EMA weights (`save_weights(..., ema=True)`)."""
    return meta.get("ema") == "true"


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - a corrupt header or truncated file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def config_of(meta: dict[str, str], path: str | Path) -> Config:
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata (not written by vidscale?)")
    return load_config_text(meta["config"], str(path))


def load_weights(path: str | Path, device: str | torch.device = "cpu"):
    """A weights file -> (VideoDiT with those weights, its Config)."""
    state, meta = read_weights(path)
    if meta.get("kind", "dit") != "dit":
        raise ValueError(f"{path}: holds a {meta.get('kind')!r} model, expected a DiT")
    cfg = config_of(meta, path)
    with torch.device("meta"):
        model = VideoDiT(model_config(cfg.model))
    model = model.to_empty(device=device)
    model.init_weights()  # buffers and anything the file does not hold
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the recipe's model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg


def find_weights(path: str | Path, ema: bool = True) -> Path:
    """A .safetensors file, or a run directory (its EMA weights when `ema` and present), or a
    folder of exported files (the one whose metadata says EMA, or raw, as asked)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"{p}: neither a run directory nor a weights file")
    for name in ([EMA_FILE, MODEL_FILE] if ema else [MODEL_FILE]):
        if (p / name).is_file():
            return p / name
    # No run weights: a folder of exports. Chosen by what each file says it holds, as above: the
    # EMA weights first when `ema`, else the raw ones; never by name. Two alike: the caller picks.
    exported = sorted(p.glob("*.safetensors"))
    by_ema = {True: [], False: []}
    for f in exported:
        by_ema[is_ema(read_metadata(f))].append(f)
    for want in ([True, False] if ema else [False]):
        found = by_ema[want]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{p}: {len(found)} {'EMA' if want else 'raw'} weights files "
                             f"({', '.join(f.name for f in found[:3])}{', ...' if len(found) > 3 else ''}); "
                             f"pass the one to use")
    if exported:
        raise ValueError(f"{p}: only EMA weights files ({', '.join(f.name for f in exported[:3])}), and the "
                         f"raw weights were asked for (--no-ema): pass one of them to use it")
    raise ValueError(f"{p}: no {MODEL_FILE} in the run directory (did the run finish? or pass "
                     f"the file written by 'vidscale export')")


def save_run_weights(engine, run_dir: Path, cfg: Config, step: int, kind: str = "dit",
                     extra: dict | None = None) -> list[Path]:
    """End of training: consolidate and write the model (and EMA) weights into the run dir.

    Every rank must call it (consolidating sharded weights is a collective); rank 0 writes.
    `engine` is any engine of scaling/train/engine.py; `extra` goes into the file's metadata.
    """
    state = engine.full_state_dict()  # full on rank 0, {} elsewhere
    ema = engine.full_ema()
    out = []
    if state:
        extra = {"step": step, **(extra or {})}
        out.append(save_weights(state, Path(run_dir) / MODEL_FILE, cfg, kind=kind, extra=extra))
        if ema:
            full = dict(state)
            full.update({k: v.to(state[k].dtype) for k, v in ema.items() if k in state})
            out.append(save_weights(full, Path(run_dir) / EMA_FILE, cfg, kind=kind, ema=True, extra=extra))
    return out
