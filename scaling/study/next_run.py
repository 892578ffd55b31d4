"""From a fit to the next run: the compute-optimal recipe for a budget (`vidscale fit CSV
--budget C --write-recipe OUT.yaml`).

The template is the resolved recipe of the sweep's run nearest to the optimum in log N at
the largest budget (SWEEP_DIR/recipes/NAME.yaml, found through the CSV's run_dir column), or
`--base RECIPE`. Its shape family is kept: the sweep's aspect ratio (hidden / depth, the
median over its runs) and head width; the depth whose shape has the parameter count closest
to N_opt is taken, hidden = aspect x depth rounded to whole heads. Steps = D_opt / (real
tokens per step of the template, scaled by the batch change); lr and tokens_per_batch from
the hyperparameter laws when the sweep fitted them. Everything run-specific (run dir,
resume, branch points) is reset, so `vidscale train OUT.yaml` starts a fresh run.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path

from vidscale.models.sizes import param_count
from vidscale.scaling.config import Config, load_config, model_config, to_yaml
from vidscale.scaling.study.fit import optimum
from vidscale.scaling.study.hparams import predict


def _recipe_of(row: dict) -> Path | None:
    run_dir = Path(row.get("run_dir") or "")
    if not row.get("run_dir"):
        return None
    for p in (run_dir.parent.parent / "recipes" / f"{run_dir.name}.yaml", run_dir / "config.yaml"):
        if p.is_file():
            return p
    return None


def _shape(cfg: Config) -> tuple[int, int, int]:
    m = model_config(cfg.model)
    return m.hidden, m.depth, m.heads


def choose_shape(template: Config, aspect: float, head_dim: int, n_opt: float) -> tuple[int, int, int, int]:
    """(hidden, depth, heads, params) of the family's shape closest to n_opt in log params."""
    best = None
    for depth in range(1, 257):
        heads = max(1, round(aspect * depth / head_dim))
        hidden = heads * head_dim
        n = param_count(model_config(replace(template.model, hidden=hidden, depth=depth, heads=heads)))
        err = abs(math.log(n / n_opt))
        if best is None or err < best[0]:
            best = (err, hidden, depth, heads, n)
        if n > 4 * n_opt:
            break
    assert best is not None
    return best[1], best[2], best[3], best[4]


def compute_optimal_recipe(result: dict, rows: list[dict], budget: float, base: str = "") -> tuple[Config, dict]:
    """The recipe and what it was derived from (for the header)."""
    law = result["_law"]
    n_opt, d_opt, loss = optimum(law, budget)
    if not (0 < n_opt < math.inf and 0 < d_opt < math.inf):
        raise ValueError(f"--write-recipe: the fitted law puts the optimum at C = {budget:g} at N = {n_opt:.3g}, "
                         f"D = {d_opt:.3g} (a degenerate fit: see its warnings); no recipe written")
    pred = next((p for p in result["predictions"] if p["budget"] == budget), None)
    if base:
        template = load_config(base)
        shapes = [_shape(template)]
        tok_per_step, tpb0 = None, template.train.tokens_per_batch
    else:
        # each finished run's resolved recipe, loaded once (OmegaConf merges are slow)
        done = {id(r): (r, load_config(p)) for r in rows
                if (r.get("status") or "done") == "done" and (p := _recipe_of(r)) is not None}
        if not done:
            raise ValueError("--write-recipe needs the recipes of the sweep's runs (a results.csv with a run_dir "
                             "column, in its sweep directory) or --base RECIPE")
        top = max(float(r.get("budget") or r.get("flops") or 0) for r, _ in done.values())
        at_top = [r for r, _ in done.values() if float(r.get("budget") or r.get("flops") or 0) == top]
        near = min(at_top, key=lambda r: abs(math.log(float(r["params"]) / n_opt)))
        template = done[id(near)][1]
        shapes = [_shape(cfg) for _, cfg in done.values()]
        tok_per_step = float(near["tokens"]) / float(near["steps"]) if near.get("steps") else None
        tpb0 = template.train.tokens_per_batch
    aspect = statistics.median(h / d for h, d, _ in shapes)
    head_dim = statistics.median(h // max(1, n) for h, _, n in shapes)
    hidden, depth, heads, params = choose_shape(template, aspect, int(head_dim), n_opt)
    hp = result.get("hparams") or {}
    lr = predict(hp["lr"], params, budget) if hp.get("lr") and hp["lr"].get("c") is not None else template.optim.lr
    tpb = tpb0
    if hp.get("batch") and hp["batch"].get("c") is not None:
        tpb = max(64, int(round(predict(hp["batch"], params, budget) / 64)) * 64)
    if tok_per_step is None:  # no run to measure from: a packed batch is ~ its token budget
        dp = template.cluster.nproc // (template.parallel.ulysses * template.parallel.ring)
        tok_per_step = tpb0 * dp * template.train.grad_accum
    steps = max(1, round(d_opt / (tok_per_step * tpb / tpb0)))
    cfg = replace(template,
                  name=f"compute-optimal-C{budget:.2g}".replace("+", ""),
                  model=replace(template.model, hidden=hidden, depth=depth, heads=heads),
                  optim=replace(template.optim, lr=float(lr)),
                  train=replace(template.train, steps=int(steps), tokens_per_batch=int(tpb), run_dir=""),
                  checkpoint=replace(template.checkpoint, resume="", branch_from="", keep_steps=[]))
    info = {"budget": budget, "N_opt": n_opt, "D_opt": d_opt, "loss": loss, "params": params,
            "loss_ci": pred["ci"]["loss"] if pred else None, "aspect": aspect, "lr": lr, "tokens_per_batch": tpb,
            "steps": steps, "hparams": sorted(k for k, v in hp.items() if v and v.get("c") is not None)}
    return cfg, info


def write_recipe(cfg: Config, info: dict, out: str | Path, source: str) -> Path:
    """OUT.yaml: the recipe, headed by comments that say where it came from and what it should reach."""
    ci = info["loss_ci"]
    head = [f"# Compute-optimal recipe for C = {info['budget']:.3g} FLOPs, written by `vidscale fit {source} "
            f"--budget {info['budget']:g} --write-recipe`.",
            f"# Fitted optimum: N_opt = {info['N_opt']:.4g} parameters, D_opt = {info['D_opt']:.4g} tokens; "
            f"this shape has {info['params']} parameters (aspect {info['aspect']:.3g}).",
            f"# Predicted final loss: {info['loss']:.4f}" + (f" (95% interval [{ci[0]:.4f}, {ci[1]:.4f}])" if ci else ""),
            f"# lr {info['lr']:.4g} and tokens_per_batch {info['tokens_per_batch']} "
            + (f"from the fitted {' and '.join(info['hparams'])} law(s)" if info["hparams"] else "from the template"),
            f"# steps {info['steps']} = D_opt / real tokens per step. Train with: vidscale train {out}",
            f"# fit: {json.dumps({k: info[k] for k in ('N_opt', 'D_opt', 'loss')})}"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(head) + "\n" + to_yaml(cfg))
    try:
        os.link(tmp, out)  # whole, and never over an existing file
    except FileExistsError:
        raise ValueError(f"{out}: exists; --write-recipe never overwrites a file (choose another name)") from None
    finally:
        tmp.unlink()
    return out
